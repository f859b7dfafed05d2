"""What to tell a user whose checkpoint and model do not fit, at fairseq-train's start-up.

Used by the `explain_model_loading` patch (fairseq_patches.py), which calls `load_failure` when fairseq
could not load a checkpoint into the model it built, and `require_pretrained_weights` after fairseq
loaded (or did not find) one. Both only read: they never change what fairseq loads.

- A checkpoint built for other architecture flags: fairseq prints torch's list of every mismatched tensor
  and "please ensure that the architectures match" (fairseq/trainer.py:596-599). We name the
  checkpoint's architecture next to the one the flags built and the flags that rebuild it: a folder
  written by `python -m hf2fairseq` holds them in convert.json (`train_args`).
- A model registered by `hf2fairseq` (converted BERT-family weights) that got no checkpoint: fairseq only
  logs "No existing checkpoint found" (trainer.py:689) and trains from random weights.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

_FAILED = re.compile(r"Cannot load model parameters from checkpoint (.+); please ensure")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# hf_bert's additions to RoBERTa (hf2fairseq/model.py): a checkpoint holding them was converted for hf_bert
_HF_BERT_KEYS = ("encoder.sentence_encoder.embed_segments.weight", "pooler.weight")
_ARCH_FLAGS = ("encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads")


def _value(cfg, key: str):
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def checkpoint_model_cfg(state: dict):
    """The model config a fairseq checkpoint was saved with (`cfg.model`, or the old `args`)."""
    cfg = state.get("cfg")
    return _value(cfg, "model") if cfg is not None else state.get("args")


def describe(shapes: dict, model_cfg) -> str:
    """'arch hf_bert: 6 layers, dim 384, FFN 1536, 12 heads, 128 positions, ...' from tensor shapes."""
    parts = [f"arch {_value(model_cfg, '_name') or _value(model_cfg, 'arch')}"]
    layers = {int(m.group(1)) for k in shapes for m in [_LAYER.search(k)] if m and "sentence_encoder" in k}
    if layers:
        parts.append(f"{max(layers) + 1} layers")
    embed = shapes.get("encoder.sentence_encoder.embed_tokens.weight")
    if embed:
        parts.append(f"dim {embed[1]}")
    ffn = shapes.get("encoder.sentence_encoder.layers.0.fc1.weight")
    if ffn:
        parts.append(f"FFN {ffn[0]}")
    heads = _value(model_cfg, "encoder_attention_heads")
    if heads:
        parts.append(f"{heads} heads")
    positions = shapes.get("encoder.sentence_encoder.embed_positions.weight")
    if positions:  # learned positions keep padding_idx + 1 = 2 extra rows (fairseq/modules/positional_embedding.py)
        parts.append(f"{positions[0] - 2} positions")
    if all(k in shapes for k in _HF_BERT_KEYS):
        parts.append("BERT segment embeddings and pooler")
    return ", ".join(parts)


def differences(checkpoint: dict, model: dict) -> list[str]:
    """Tensors that do not fit, outside the classification heads (fairseq re-creates a head that differs)."""
    out = []
    # the encoder first: a different lm_head follows from a different encoder and says less
    for key in sorted(set(checkpoint) | set(model), key=lambda k: ("lm_head" in k, k)):
        if "classification_heads." in key:
            continue
        if key not in model:
            out.append(f"{key}: only in the checkpoint")
        elif key not in checkpoint:
            out.append(f"{key}: only in the model")
        elif checkpoint[key] != model[key]:
            out.append(f"{key}: checkpoint {checkpoint[key]}, model {model[key]}")
    return out


def rebuild_flags(checkpoint_path: Path, model_cfg, model_is_converted: bool) -> str:
    """How to build the checkpoint's architecture: convert.json's flags, else the checkpoint's config."""
    meta_file = checkpoint_path.parent / "convert.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        text = (
            f'It was written by `python -m hf2fairseq`: pass the "train_args" of {meta_file} (with '
            f"--user-dir robustft):\n  {shlex.join(meta['train_args'])}"
        )
        if meta.get("arch") != "roberta_base" and not model_is_converted:
            text += (
                f"\nStock fairseq models (--arch roberta_base) cannot load a {meta.get('arch')} checkpoint (it holds "
                "segment embeddings and the BERT pooler). For stock fairseq, convert again with "
                "`python -m hf2fairseq ... --arch roberta_base` and pass that folder's convert.json "
                '"train_args_stock_fairseq".'
            )
        return text
    flags = [f"--arch {_value(model_cfg, '_name') or _value(model_cfg, 'arch')}"]
    for name in _ARCH_FLAGS + ("max_positions",):
        if _value(model_cfg, name) is not None:
            flags.append(f"--{name.replace('_', '-')} {_value(model_cfg, name)}")
    return "Pass the architecture flags it was saved with (its cfg.model):\n  " + " ".join(flags)


def load_failure(err: Exception, trainer) -> str | None:
    """The message for fairseq's "Cannot load model parameters from checkpoint ..."; None for any other error
    or when the tensors do fit (then the original error stands)."""
    found = _FAILED.search(str(err))
    if found is None:
        return None
    from fairseq import checkpoint_utils

    path = Path(found.group(1))
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    except Exception:  # the original error is more useful than one about reading the file again
        return None
    shapes = {k: tuple(v.shape) for k, v in state["model"].items() if hasattr(v, "shape")}
    model = trainer.get_model()
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    diff = differences(shapes, model_shapes)
    if not diff:
        return None
    saved_cfg = checkpoint_model_cfg(state)
    more = f" (and {len(diff) - 3} more)" if len(diff) > 3 else ""
    return (
        f"checkpoint {path} does not fit the model your flags build.\n"
        f"  checkpoint: {describe(shapes, saved_cfg)}\n"
        f"  your flags: {describe(model_shapes, trainer.cfg.model)}\n"
        f"  e.g. {'; '.join(diff[:3])}{more}\n" + rebuild_flags(path, saved_cfg, is_converted_model(model))
    )


def is_converted_model(model) -> bool:
    """A model of `hf2fairseq` (hf_bert and its kin): built to hold converted pretrained weights."""
    return type(model).__module__.split(".")[0] == "hf2fairseq"


def require_pretrained_weights(extra_state, checkpoint_cfg, trainer) -> None:
    """A converted-model architecture trained from random weights is a forgotten --restore-file: stop.

    `extra_state` is what `Trainer.load_checkpoint` returned: None when no file was found (trainer.py:689)."""
    if extra_state is not None or not is_converted_model(trainer.get_model()):
        return
    arch = _value(trainer.cfg.model, "arch") or _value(trainer.cfg.model, "_name")
    restore = checkpoint_cfg.restore_file
    why = (
        f"--restore-file {restore} does not exist"
        if restore != "checkpoint_last.pt"
        else f"no --restore-file or --finetune-from-model was given (and {checkpoint_cfg.save_dir} has no "
        "checkpoint_last.pt to resume)"
    )
    raise ValueError(
        f"--arch {arch}: {why}, so the model would train from random weights. {arch} is for weights "
        "converted by `python -m hf2fairseq`: add --restore-file DIR/model.pt --reset-optimizer "
        "--reset-dataloader --reset-meters (DIR: the converter's output folder, whose convert.json holds the "
        "--arch flags). For a randomly initialised encoder use --arch roberta_base."
    )
