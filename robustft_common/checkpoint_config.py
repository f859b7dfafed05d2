"""Config values fairseq would run as Python code: a checkpoint carrying anything but a literal there is refused.

weights_only loading stops pickled code, but fairseq itself calls `eval()` on some config strings when it
builds a model, a task, a criterion or an optimizer (e.g. `utils.eval_str_dict(xformers_att_config)` in
`MultiheadAttention.__init__`, fairseq/modules/multihead_attention.py:96). A checkpoint's `cfg`/`args` is
where those strings come from when fairseq loads it (`load_model_ensemble_and_task` builds the model from
the checkpoint's `cfg.model`, fairseq/checkpoint_utils.py:451-455, 497-500), so a string like
`__import__('os').system(...)` there runs code although nothing executable was pickled.

EVAL_SITES is the audit of fairseq-fixed 0.12.3.1 (outside `fairseq/examples`, which fairseq never imports
by itself): every call of `eval`, `utils.eval_str_list`, `utils.eval_str_dict` and `utils.eval_bool`, with
the config field it reads, or why it cannot read a checkpoint's config. tests/test_fairseq_patches.py scans
fairseq's source and fails when the set of call sites changes. Every value of a field named in
EVALUATED_FIELDS, anywhere in a checkpoint's `cfg` or `args` (any nesting, omegaconf or Namespace), must be
a literal expression: Python literals (numbers, strings, None/True/False, tuples, lists, dicts, sets),
signs, and `+`/`*` between them with repeat counts <= MAX_REPEAT (fairseq's own defaults look like
`[(512, 3)] * 20`), at most MAX_CHARS characters. bytes are refused (eval compiles them too).
"""

from __future__ import annotations

import argparse
import ast

from robustft_common.checkpoint_files import CheckpointRefusedError

MAX_CHARS = 10_000
MAX_REPEAT = 1_000

# (file, the evaluated expression as written there) -> the config field it reads, or None and why not
EVAL_SITES: dict[tuple[str, str], str | tuple[None, str]] = {
    ("fairseq/modules/multihead_attention.py", "xformers_att_config"): "xformers_att_config",
    ("fairseq/optim/adam.py", "self.cfg.adam_betas"): "adam_betas",
    ("fairseq/optim/cpu_adam.py", "self.cfg.adam_betas"): "adam_betas",
    ("fairseq/optim/adamax.py", "self.args.adamax_betas"): "adamax_betas",
    ("fairseq/optim/adafactor.py", "self.args.adafactor_eps"): "adafactor_eps",
    ("fairseq/optim/fused_lamb.py", "self.args.lamb_betas"): "lamb_betas",
    ("fairseq/criterions/ctc.py", "cfg.wer_args"): "wer_args",
    ("fairseq/data/audio/raw_audio_dataset.py", "feature_encoder_spec"): "feature_encoder_spec",
    ("fairseq/tasks/multilingual_translation.py", "args.left_pad_source"): "left_pad_source",
    ("fairseq/tasks/multilingual_translation.py", "args.left_pad_target"): "left_pad_target",
    ("fairseq/tasks/online_backtranslation.py", "args.left_pad_source"): "left_pad_source",
    ("fairseq/tasks/online_backtranslation.py", "args.left_pad_target"): "left_pad_target",
    ("fairseq/data/multilingual/multilingual_data_manager.py", "args.left_pad_source"): "left_pad_source",
    ("fairseq/data/multilingual/multilingual_data_manager.py", "args.left_pad_target"): "left_pad_target",
    ("fairseq/distributed/utils.py", "cfg.pipeline_balance"): "pipeline_balance",
    ("fairseq/distributed/utils.py", "cfg.pipeline_devices"): "pipeline_devices",
    ("fairseq/distributed/utils.py", "cfg.pipeline_encoder_devices"): "pipeline_encoder_devices",
    ("fairseq/distributed/utils.py", "cfg.pipeline_decoder_devices"): "pipeline_decoder_devices",
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_balance"): (
        "pipeline_balance"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_devices"): (
        "pipeline_devices"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_encoder_balance"): (
        "pipeline_encoder_balance"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_encoder_devices"): (
        "pipeline_encoder_devices"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_decoder_balance"): (
        "pipeline_decoder_balance"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/model.py", "args.pipeline_decoder_devices"): (
        "pipeline_decoder_devices"
    ),
    ("fairseq/model_parallel/models/pipeline_parallel_transformer/layers.py", "args.adaptive_softmax_cutoff"): (
        "adaptive_softmax_cutoff"
    ),
    ("fairseq/models/transformer/transformer_decoder.py", "cfg.adaptive_softmax_cutoff"): "adaptive_softmax_cutoff",
    ("fairseq/models/lstm.py", "args.adaptive_softmax_cutoff"): "adaptive_softmax_cutoff",
    ("fairseq/models/lstm.py", "args.decoder_attention"): "decoder_attention",
    ("fairseq/models/lstm_lm.py", "args.adaptive_softmax_cutoff"): "adaptive_softmax_cutoff",
    ("fairseq/models/lightconv.py", "args.adaptive_softmax_cutoff"): "adaptive_softmax_cutoff",
    ("fairseq/models/fconv_lm.py", "args.adaptive_softmax_cutoff"): "adaptive_softmax_cutoff",
    ("fairseq/models/fconv_lm.py", "args.decoder_layers"): "decoder_layers",
    ("fairseq/models/fconv_lm.py", "args.decoder_attention"): "decoder_attention",
    ("fairseq/models/fconv.py", "args.encoder_layers"): "encoder_layers",
    ("fairseq/models/fconv.py", "args.decoder_layers"): "decoder_layers",
    ("fairseq/models/fconv.py", "args.decoder_attention"): "decoder_attention",
    ("fairseq/models/fconv_self_att.py", "args.pretrained"): "pretrained",
    ("fairseq/models/fconv_self_att.py", "args.encoder_layers"): "encoder_layers",
    ("fairseq/models/fconv_self_att.py", "args.encoder_attention"): "encoder_attention",
    ("fairseq/models/fconv_self_att.py", "args.decoder_layers"): "decoder_layers",
    ("fairseq/models/fconv_self_att.py", "args.decoder_attention"): "decoder_attention",
    ("fairseq/models/fconv_self_att.py", "args.self_attention"): "self_attention",
    ("fairseq/models/fconv_self_att.py", "args.project_input"): "project_input",
    ("fairseq/models/fconv_self_att.py", "args.gated_attention"): "gated_attention",
    ("fairseq/models/fconv_self_att.py", "args.downsample"): "downsample",
    ("fairseq/models/lightconv_lm.py", "args.character_filters"): "character_filters",
    ("fairseq/models/lightconv_lm.py", "args.adaptive_input_cutoff"): "adaptive_input_cutoff",
    ("fairseq/models/transformer_lm.py", "args.character_filters"): "character_filters",
    ("fairseq/models/transformer_lm.py", "args.adaptive_input_cutoff"): "adaptive_input_cutoff",
    ("fairseq/models/hubert/hubert.py", "cfg.conv_feature_layers"): "conv_feature_layers",
    ("fairseq/models/wav2vec/wav2vec.py", "cfg.conv_feature_layers"): "conv_feature_layers",
    ("fairseq/models/wav2vec/wav2vec.py", "cfg.conv_aggregator_layers"): "conv_aggregator_layers",
    ("fairseq/models/wav2vec/wav2vec2.py", "cfg.conv_feature_layers"): "conv_feature_layers",
    ("fairseq/models/wav2vec/wav2vec2.py", "self.cfg.conv_feature_layers"): "conv_feature_layers",
    ("fairseq/models/speech_to_text/s2t_wav_transformer.py", "args.conv_feature_layers"): "conv_feature_layers",
    ("fairseq_cli/eval_lm.py", "cfg.common_eval.model_overrides"): "model_overrides",
    # not from a checkpoint: the definitions themselves, command-line parsing, data files
    ("fairseq/utils.py", "x"): (None, "the definitions of eval_str_list / eval_str_dict / eval_bool"),
    ("fairseq/dataclass/utils.py", "x"): (None, "argparse type= of List fields: command-line strings only"),
    ("fairseq/models/lightconv.py", "x"): (None, "argparse type=: command-line strings only"),
    ("fairseq/models/lightconv_lm.py", "x"): (None, "argparse type=: command-line strings only"),
    ("fairseq/data/multilingual/multilingual_data_manager.py", "uf"): (None, "argparse type=: command line only"),
    ("fairseq/data/codedataset.py", "line.strip()"): (None, "lines of a data file, not a config value"),
    ("fairseq_cli/validate.py", "getattr(override_args, 'model_overrides', '{}')"): (
        None,
        "--model-overrides of the validate command line, never the checkpoint's",
    ),
}
# eval_lm's model_overrides comes from its own command line, but checking a checkpoint's copy costs nothing
EVALUATED_FIELDS = frozenset(
    {field for field in EVAL_SITES.values() if isinstance(field, str)}
    | {"encoder_xformers_att_config", "decoder_xformers_att_config"}  # args spellings of xformers_att_config
)


def literal_problem(text: str) -> str | None:
    """Why `eval(text)` could do more than build a literal value, or None when it cannot."""
    if len(text) > MAX_CHARS:
        return f"{len(text)} characters long (at most {MAX_CHARS})"
    try:
        tree = ast.parse(text.lstrip(" \t"), mode="eval")  # eval() strips leading spaces and tabs too
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        return f"not a Python literal ({type(err).__name__}: {err})"
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            if not _bounded_repeat(node):
                return f"`{ast.unparse(node)[:80]}` repeats more than {MAX_REPEAT} times or nests repeats"
            continue
        if not isinstance(node, _LITERAL_NODES):
            return f"`{ast.unparse(node)[:80]}` is a {type(node).__name__}, not a literal"
    return None


_LITERAL_NODES = (
    ast.Expression,
    ast.Constant,
    ast.Tuple,
    ast.List,
    ast.Set,
    ast.Dict,
    ast.Load,
    ast.UnaryOp,
    ast.UAdd,
    ast.USub,
    ast.Add,
    ast.Sub,
    ast.Mult,
)


def _bounded_repeat(node: ast.BinOp) -> bool:
    """`seq * n` / `n * seq` with an int constant n <= MAX_REPEAT and no repeat inside seq, or number * number."""
    sides = (node.left, node.right)
    if all(isinstance(s, ast.Constant) and type(s.value) in (int, float, complex) for s in sides):
        return True
    for count, seq in (sides, sides[::-1]):
        if isinstance(count, ast.Constant) and type(count.value) is int and abs(count.value) <= MAX_REPEAT:
            return not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mult) for n in ast.walk(seq))
    return False


def evaluated_values(state: dict):
    """(where, value) for every value of an EVALUATED_FIELDS field in the checkpoint's `args` and `cfg`."""
    seen: set = set()
    for root in ("args", "cfg"):
        yield from _walk(state.get(root), root, seen)


def _walk(node, where: str, seen: set):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)  # raw strings: interpolations are not resolved
    if isinstance(node, argparse.Namespace):
        node = vars(node)
    if not isinstance(node, (dict, list, tuple)) or id(node) in seen:
        return
    seen.add(id(node))  # a pickle can hold cycles
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        here = f"{where}.{key}" if isinstance(node, dict) else f"{where}[{key}]"
        if key in EVALUATED_FIELDS and isinstance(value, (str, bytes)):
            yield here, value
        yield from _walk(value, here, seen)


def refuse_evaluated_values(state: dict, path) -> None:
    """CheckpointRefusedError naming `path` and the field when a value fairseq may eval() is not a literal."""
    for where, value in evaluated_values(state):
        problem = "bytes, which eval() would compile" if isinstance(value, bytes) else literal_problem(value)
        if problem:
            raise CheckpointRefusedError(
                f"refusing to load checkpoint {path}: {where} = {value[:120]!r}: {problem}. fairseq passes "
                f"this field to eval() when it builds the model/task (robustft_common/checkpoint_config.py "
                f"lists where), so loading the file would run that code. A genuine fairseq checkpoint holds a "
                f"literal there; do not load this file."
            )
