"""Every component the plugin registers with fairseq, with each flag, its default and its help.

`fairseq-train --help` cannot show them: fairseq prints its help before `--user-dir` components add their
flags. This listing asks each component for its flags the way fairseq does (`cls.add_args(parser)`, which
for a FairseqDataclass config is `gen_parser_from_dataclass`, fairseq/dataclass/utils.py:53), so it cannot
drift from the code:

    python -m robustft flags                                 # every component
    python -m robustft flags sentence_prediction_r3f hf_bert # some of them

A component that extends a stock fairseq one (our criterions extend `sentence_prediction`, `hf_bert`
extends `roberta`) lists its own flags and names the stock component whose flags it also takes.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Flag:
    option: str  # the long option string, e.g. --r3f-lambda
    metavar: str  # "" for switches (store_true / store_false)
    default: object
    help: str
    choices: tuple = ()


@dataclass
class Component:
    kind: str  # task, model, criterion, optimizer, lr_scheduler, bpe, tokenizer, scoring
    name: str
    cls: type
    flags: list[Flag]  # the component's own flags (new, or a stock flag with another default)
    base: str | None = None  # the stock fairseq component it extends, whose flags it also takes
    base_flags: list[str] = field(default_factory=list)
    archs: list[str] = field(default_factory=list)  # models: the --arch names registered for it


def registries() -> list[tuple[str, dict]]:
    """fairseq's registries, as (kind, {name: class})."""
    from fairseq.models import MODEL_REGISTRY
    from fairseq.registry import REGISTRIES
    from fairseq.tasks import TASK_REGISTRY

    import robustft  # noqa: F401  (registers every component of the plugin)

    kinds = ("criterion", "optimizer", "lr_scheduler", "bpe", "tokenizer", "scoring")
    return [("task", TASK_REGISTRY), ("model", MODEL_REGISTRY)] + [(k, REGISTRIES[k]["registry"]) for k in kinds]


def is_plugin_class(cls: type) -> bool:
    """Registered by the plugin, not by fairseq itself (fairseq's own classes live under `fairseq.`)."""
    return cls.__module__.split(".")[0] != "fairseq"


def parser_flags(cls: type) -> dict[str, Flag]:
    """The flags `cls.add_args` adds, by long option string."""
    parser = argparse.ArgumentParser(add_help=False)
    add_args = getattr(cls, "add_args", None)
    if add_args is not None:
        add_args(parser)
    flags = {}
    for action in parser._actions:
        if not action.option_strings:
            continue
        option = max(action.option_strings, key=len)
        switch = action.nargs == 0
        metavar = "" if switch else str(action.metavar or action.dest.upper())
        choices = tuple(action.choices) if action.choices else ()
        flags[option] = Flag(option, metavar, action.default, " ".join((action.help or "").split()), choices)
    return flags


def stock_base(cls: type, registry: dict) -> tuple[str, type] | None:
    """The nearest registered fairseq component `cls` derives from (e.g. `sentence_prediction`)."""
    for base in cls.__mro__[1:]:
        if base.__module__.startswith("fairseq."):
            names = [n for n, c in registry.items() if c is base]
            if names:
                return names[0], base
    return None


def components() -> list[Component]:
    """Every plugin component of every registry, in registry order."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    found = []
    for kind, registry in registries():
        for name, cls in registry.items():
            if not is_plugin_class(cls):
                continue
            own = parser_flags(cls)
            base = stock_base(cls, registry)
            inherited = parser_flags(base[1]) if base else {}
            flags = [f for opt, f in own.items() if opt not in inherited or inherited[opt].default != f.default]
            base_flags = [opt for opt in own if opt in inherited and inherited[opt].default == own[opt].default]
            archs = [a for a, c in ARCH_MODEL_REGISTRY.items() if c is cls] if kind == "model" else []
            found.append(Component(kind, name, cls, flags, base[0] if base else None, base_flags, archs))
    return found


def source_file(cls: type) -> str:
    path = Path(inspect.getsourcefile(cls) or "?").resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def format_component(c: Component, width: int = 110) -> str:
    lines = [f"{c.kind} {c.name}  ({source_file(c.cls)})"]
    if c.archs:
        lines += _wrap(f"--arch: {', '.join(c.archs)}", width, "  ", "    ")
    for f in c.flags:
        head = f"  {f.option}" + (f" {f.metavar}" if f.metavar else "")
        text = f"default: {f.default!r}" + (f"; one of {', '.join(map(str, f.choices))}" if f.choices else "")
        text += f". {f.help}" if f.help else ""
        lines.append(head)
        lines += _wrap(text, width, "      ", "      ")
    if not c.flags:
        lines.append("  (no flags of its own)")
    if c.base:
        also = f"also takes the flags of fairseq's {c.kind} {c.base}: {', '.join(c.base_flags) or '-'}"
        lines += _wrap(also, width, "  ", "    ")
    return "\n".join(lines)


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    # flags are hyphenated words: never break inside one
    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def listing(names: list[str] | None = None) -> str:
    """The text `python -m robustft flags [NAME ...]` prints; SystemExit for a name no component has."""
    found = components()
    if names:
        known = {c.name for c in found} | {a for c in found for a in c.archs}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"no plugin component named {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        found = [c for c in found if c.name in names or set(c.archs) & set(names)]
    header = (
        "Flags of the components registered by --user-dir robustft (fairseq-train --help does not show them).\n"
        "Generated from the components' configs; docs: README.md 'Registered names'.\n\n"
    )
    return header + "\n\n".join(format_component(c) for c in found) + "\n"
