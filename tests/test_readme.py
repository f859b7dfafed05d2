"""The README's registered-names table stays current with what the plugin registers."""

import re

from tests.fairseq_helpers import REPO

OUR_PACKAGES = {"rxf_src", "hype_src", "pats_src", "hyperdecoder_src", "robustft", "hf2fairseq", "baselines_src"}


def _registered():
    from fairseq.criterions import CRITERION_REGISTRY
    from fairseq.models import ARCH_MODEL_REGISTRY, MODEL_REGISTRY
    from fairseq.optim import OPTIMIZER_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    import robustft  # noqa: F401

    found = set()
    for kind, registry in (
        ("criterion", CRITERION_REGISTRY),
        ("optimizer", OPTIMIZER_REGISTRY),
        ("model", MODEL_REGISTRY),
        ("task", TASK_REGISTRY),
    ):
        found |= {(kind, n) for n, cls in registry.items() if cls.__module__.split(".")[0] in OUR_PACKAGES}
    found |= {("arch", n) for n, cls in ARCH_MODEL_REGISTRY.items() if cls.__module__.split(".")[0] in OUR_PACKAGES}
    return found


def test_every_registered_name_is_in_the_readme_table():
    readme = (REPO / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in {"criterion", "optimizer", "model", "arch", "task"}:
            for name in re.findall(r"`([^`]+)`", cells[1]):
                rows.setdefault(cells[0], set()).add(name)
    registered = _registered()
    assert registered, "the plugin registered nothing"
    missing = sorted(f"{k} {n}" for k, n in registered if n not in rows.get(k, set()))
    assert not missing, f"README 'Registered names' lacks: {missing}"
    stale = sorted(f"{k} {n}" for k, names in rows.items() for n in names if (k, n) not in registered)
    assert not stale, f"README lists names that are not registered: {stale}"


def test_method_table_is_generated_from_the_registry():
    """The README's method table is exactly what the registry generates (regenerate: see the marker)."""
    from robustft_common.methods import METHODS, methods_table_markdown

    readme = (REPO / "README.md").read_text()
    start = readme.index("<!-- methods-table:start")
    start = readme.index("\n", start) + 1
    end = readme.index("<!-- methods-table:end -->")
    table = readme[start:end]
    assert table == methods_table_markdown(), (
        "README method table differs from robustft_common/methods.py; regenerate it with "
        "`python -m robustft_common.methods table`"
    )
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines() if line.startswith("| `")]
    assert rows == list(METHODS)  # one row per method, in the registry's order
