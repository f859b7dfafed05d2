#!/usr/bin/env python
"""Export a sentence-classification checkpoint fine-tuned with the plugin to a transformers folder.

    python -m hf2fairseq.export CHECKPOINT --output-dir OUT [--data DIR] [--tokenizer-dir DIR]

CHECKPOINT: `fairseq-train --task sentence_prediction` (any criterion / optimizer of the plugin) from
- a BERT-family model converted by `python -m hf2fairseq` (arch `hf_bert`) -> BertForSequenceClassification:
  the head's dense is BERT's pooler, out_proj its classifier, `embed_segments` the token-type table;
- an ELECTRA discriminator converted by `python -m hf2fairseq` (arch `hf_electra`) ->
  ElectraForSequenceClassification (head dense/out_proj = ElectraClassificationHead's);
- fairseq's own RoBERTa / XLM-R, or one imported by `python -m hf2fairseq` (arch `roberta*`) ->
  RobertaForSequenceClassification (GPT-2 BPE) or XLMRobertaForSequenceClassification (SentencePiece),
  the vocab in fairseq's order as transformers' roberta-base / xlm-roberta-base have it.
A spectral-normalised head (R4F: `--spectral-norm-classification-head`, `--r4f-spectral-norm-dense`) is
exported as the normalised matrices W / sigma it computes with in eval (saved u, v), i.e. a plain Linear.
HyPe, R3F, PATS, SAGE, NoisyTune only change training: their checkpoints are plain models.
Hyperdecoder checkpoints (`hyperdecoder_bart*`, BART with generated adapters) have no transformers
class and are refused.

--data: the binarized data the model was fine-tuned on (default: the checkpoint's task.data): its
input0/dict.txt is the model's dictionary and label/dict.txt gives `id2label` (class i = label symbol
nspecial + i, fairseq's sentence_prediction target). --tokenizer-dir: the folder of the model fine-tuning
started from (default: the folder of the checkpoint's --restore-file / --finetune-from-model): vocab.txt +
convert.json of a converted model, encoder.json + vocab.bpe (RoBERTa), or sentencepiece.bpe.model (XLM-R).

OUT (written by transformers' own save_pretrained into a temporary folder, renamed at the end): config.json
(architectures, id2label / label2id, problem_type `regression` for --regression-target heads like STS-B's),
model.safetensors, tokenizer.json + tokenizer_config.json (+ vocab.txt / sentencepiece.bpe.model), and
fairseq_export.json (source, check). Before the rename the folder is loaded back with
AutoModelForSequenceClassification and its logits are compared with fairseq's on the first `--check-examples`
examples of the `valid` split (fed as fairseq's ids, mapped to the exported vocab): the export fails if they
differ by more than `--tolerance` (1e-4).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from hf2fairseq import export_tokenizers as toks
from hf2fairseq.convert import LAYER_KEYS
from hf2fairseq.hf_extra import require_transformers

HEAD = "sentence_classification_head"
ENC = "encoder.sentence_encoder."
# fairseq model name -> (transformers family, the head's activation transformers hard-codes)
EXPORTABLE = {"hf_bert": ("bert", "tanh"), "hf_electra": ("electra", "gelu"), "roberta": (None, "tanh")}
FAMILIES = {  # family -> (config class, model class, encoder prefix in the state dict)
    "bert": ("BertConfig", "BertForSequenceClassification", "bert."),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", "electra."),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", "roberta."),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", "roberta."),
}
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh", "gelu_accurate": "gelu_new"}  # fairseq -> hf
FAIRSEQ_EPS = 1e-5


def _get(node, key: str, default=None):
    """A config value from an omegaconf node or a legacy model's argparse Namespace (None -> default)."""
    from fairseq.utils import safe_getattr

    return safe_getattr(node, key, default)


def model_name_of(cfg) -> str:
    """The registered model of the checkpoint's arch (`roberta_base` -> `roberta`)."""
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    arch = _get(cfg.model, "_name") or _get(cfg.model, "arch")
    return ARCH_MODEL_NAME_REGISTRY.get(arch, arch)


def check_exportable(cfg, checkpoint: Path) -> str:
    """Refuse, with the reason, what has no transformers counterpart; returns the model name."""
    name = model_name_of(cfg)
    if str(name).startswith("hyperdecoder"):
        raise SystemExit(
            f"{checkpoint}: arch {_get(cfg.model, '_name')} (hyperdecoder) is not exported: a BART encoder-decoder "
            "whose decoder adapters a hypernetwork generates per input has no transformers model class"
        )
    if name not in EXPORTABLE:
        raise SystemExit(
            f"{checkpoint}: model {name!r} is not exported; exportable: {', '.join(EXPORTABLE)} "
            "(converted BERT/ELECTRA, fairseq's RoBERTa/XLM-R)"
        )
    if _get(cfg.task, "_name") != "sentence_prediction":
        raise SystemExit(
            f"{checkpoint}: task {_get(cfg.task, '_name')!r}; the export writes *ForSequenceClassification "
            "models, i.e. checkpoints of --task sentence_prediction"
        )
    m = cfg.model
    for flag, key, want in (
        ("--encoder-normalize-before", "encoder_normalize_before", False),
        ("--layernorm-embedding", "layernorm_embedding", True),
        ("--no-scale-embedding", "no_scale_embedding", True),
        ("--encoder-learned-pos", "encoder_learned_pos", True),
        ("--no-token-positional-embeddings", "no_token_positional_embeddings", False),
    ):
        if bool(_get(m, key, want)) != want:
            raise SystemExit(f"{checkpoint}: {flag} is {not want}; transformers' BERT/RoBERTa need it {want}")
    if _get(m, "activation_fn", "gelu") not in ACTIVATIONS:
        raise SystemExit(f"{checkpoint}: --activation-fn {m.activation_fn} has no transformers hidden_act")
    head_act = EXPORTABLE[name][1]
    if _get(m, "pooler_activation_fn", head_act) != head_act:
        raise SystemExit(
            f"{checkpoint}: --pooler-activation-fn {m.pooler_activation_fn}; transformers' head for this model "
            f"uses {head_act}"
        )
    return name


def check_input_layout(cfg, data: Path, family: str, checkpoint: Path) -> None:
    """transformers' tokenizers build `[CLS] A [SEP] B [SEP]` (BERT) / `<s> A </s></s> B </s>` (RoBERTa)."""
    if _get(cfg.task, "init_token") != 0:
        raise SystemExit(
            f"{checkpoint}: trained with --init-token {_get(cfg.task, 'init_token')}; transformers' tokenizers "
            "start every input with <s> / [CLS] (fairseq id 0): fine-tune with --init-token 0"
        )
    if not (data / "input1").exists():
        return
    want = None if family in ("bert", "electra") else 2
    if _get(cfg.task, "separator_token") != want:
        layout = "[CLS] A [SEP] B [SEP] (no --separator-token)" if want is None else "<s> A </s> </s> B </s> (2)"
        raise SystemExit(
            f"{checkpoint}: pairs trained with --separator-token {_get(cfg.task, 'separator_token')}, but "
            f"transformers' tokenizer for this model builds {layout}: the exported model would see other inputs"
        )


def head_matrix(linear: torch.nn.Module) -> torch.Tensor:
    """A head Linear's matrix as eval uses it: W_orig / sigma (saved u, v) under torch's spectral_norm."""
    from robustft_common.spectral_norm_heads import is_spectral_normed, normalised_weight

    if is_spectral_normed(linear):
        return normalised_weight(*(getattr(linear, f"weight{s}") for s in ("_orig", "_u", "_v")))
    return getattr(linear, "weight")  # noqa: B009  (typed: nn.Module's attributes are Tensor | Module)


def encoder_state(sd: dict, prefix: str, num_layers: int) -> dict:
    """transformers' encoder layers + embedding LayerNorm from fairseq's (inverse of convert.put_layers)."""
    out = {
        f"{prefix}embeddings.LayerNorm.weight": sd[ENC + "layernorm_embedding.weight"],
        f"{prefix}embeddings.LayerNorm.bias": sd[ENC + "layernorm_embedding.bias"],
    }
    for i in range(num_layers):
        for hf_name, fs_name in LAYER_KEYS.items():
            for p in ("weight", "bias"):
                out[f"{prefix}encoder.layer.{i}.{hf_name}.{p}"] = sd[f"{ENC}layers.{i}.{fs_name}.{p}"]
    return out


def hf_state(model, family: str, head_name: str, hf_rows: list[int] | None) -> dict:
    """The transformers state dict of the fine-tuned fairseq model (its encoder + head `head_name`)."""
    sd = model.state_dict()
    prefix = FAMILIES[family][2]
    out = encoder_state(sd, prefix, len(model.encoder.sentence_encoder.layers))
    words, positions = sd[ENC + "embed_tokens.weight"], sd[ENC + "embed_positions.weight"]
    head = model.classification_heads[head_name]
    dense, out_proj = (head_matrix(head.dense), head.dense.bias), (head_matrix(head.out_proj), head.out_proj.bias)
    if family in ("bert", "electra"):
        start = model.encoder.sentence_encoder.embed_positions.padding_idx + 1
        out[prefix + "embeddings.word_embeddings.weight"] = words[torch.tensor(hf_rows)]
        out[prefix + "embeddings.position_embeddings.weight"] = positions[start:]  # BERT numbers from 0
        out[prefix + "embeddings.token_type_embeddings.weight"] = sd[ENC + "embed_segments.weight"]
    else:  # RoBERTa numbers positions from pad + 1 like fairseq, with the same pad (1): the table as it is
        out[prefix + "embeddings.word_embeddings.weight"] = words
        out[prefix + "embeddings.position_embeddings.weight"] = positions
        out[prefix + "embeddings.token_type_embeddings.weight"] = torch.zeros(1, words.shape[1], dtype=words.dtype)
    if family == "bert":  # BertForSequenceClassification: pooler (dense + tanh) -> dropout -> classifier
        (out["bert.pooler.dense.weight"], out["bert.pooler.dense.bias"]) = dense
        (out["classifier.weight"], out["classifier.bias"]) = out_proj
    else:  # RobertaClassificationHead / ElectraClassificationHead: fairseq's head, same names
        (out["classifier.dense.weight"], out["classifier.dense.bias"]) = dense
        (out["classifier.out_proj.weight"], out["classifier.out_proj.bias"]) = out_proj
    if ENC + "embed_project.weight" in sd:  # ELECTRA's embeddings_project
        out["electra.embeddings_project.weight"] = sd[ENC + "embed_project.weight"]
        out["electra.embeddings_project.bias"] = sd[ENC + "embed_project.bias"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def hf_config(transformers, model, cfg, family: str, vocab_size: int, pad_id: int, labels: dict):
    """The transformers config of the fairseq model's architecture and head."""
    m, enc = cfg.model, model.encoder.sentence_encoder
    common = dict(
        vocab_size=vocab_size,
        hidden_size=m.encoder_embed_dim,
        num_hidden_layers=len(enc.layers),
        num_attention_heads=m.encoder_attention_heads,
        intermediate_size=m.encoder_ffn_embed_dim,
        hidden_act=ACTIVATIONS[m.activation_fn],
        hidden_dropout_prob=m.dropout,
        attention_probs_dropout_prob=m.attention_dropout,
        classifier_dropout=_get(m, "pooler_dropout", 0.0),
        pad_token_id=pad_id,
        **labels,
    )
    rows = enc.embed_positions.weight.shape[0]
    if family in ("bert", "electra"):
        extra = dict(
            max_position_embeddings=rows - enc.embed_positions.padding_idx - 1,
            type_vocab_size=enc.embed_segments.weight.shape[0],
            layer_norm_eps=float(m.hf_bert_layer_norm_eps),
        )
        if family == "electra":
            extra["embedding_size"] = enc.embed_tokens.embedding_dim
    else:
        extra = dict(
            max_position_embeddings=rows, type_vocab_size=1, layer_norm_eps=FAIRSEQ_EPS, bos_token_id=0, eos_token_id=2
        )
    return getattr(transformers, FAMILIES[family][0])(**common, **extra)


def label_config(task, cfg, num_outputs: int) -> dict:
    """id2label / label2id from the label dictionary (fairseq's target = index - nspecial); regression."""
    if _get(cfg.task, "regression_target"):
        return {"num_labels": num_outputs, "problem_type": "regression"}
    labels = task.label_dictionary.symbols[task.label_dictionary.nspecial :][:num_outputs]
    if len(labels) != num_outputs:
        raise SystemExit(f"label/dict.txt has {len(labels)} labels, the head {num_outputs} outputs")
    return {
        "id2label": dict(enumerate(labels)),
        "label2id": {lab: i for i, lab in enumerate(labels)},
        "problem_type": "single_label_classification",
    }


def load_finetuned(checkpoint: Path, data: Path | None) -> tuple:
    """(model in eval, task, cfg, data dir) of a fine-tuned checkpoint, refusing what cannot be exported."""
    from fairseq import checkpoint_utils

    if not checkpoint.is_file():
        raise SystemExit(f"CHECKPOINT {checkpoint}: no such file")
    state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
    cfg = state["cfg"]
    check_exportable(cfg, checkpoint)
    data = Path(data or cfg.task.data)
    if not (data / "input0" / "dict.txt").exists():
        raise SystemExit(
            f"--data {data}: no input0/dict.txt; pass the binarized data folder the model was fine-tuned on"
        )
    cfg.task.data = str(data)
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], state=state)
    return models[0].eval(), task, cfg, data


def default_tokenizer_dir(cfg, checkpoint: Path) -> Path:
    """The folder of the model fine-tuning started from (--restore-file / --finetune-from-model)."""
    for key in ("finetune_from_model", "restore_file"):
        path = _get(cfg.checkpoint, key)
        if path and Path(path).is_file() and Path(path).resolve() != checkpoint.resolve():
            return Path(path).parent
    raise SystemExit(
        f"{checkpoint}: cannot tell which model fine-tuning started from; pass --tokenizer-dir (the "
        "`python -m hf2fairseq` output, or the folder with encoder.json + vocab.bpe / sentencepiece.bpe.model)"
    )


def build_tokenizer(transformers, model_name, dictionary, tokenizer_dir: Path, max_len: int):
    """(family, tokenizer, fairseq row of every exported id or None for the identity, extra files writer)."""
    kind = toks.tokenizer_kind(model_name, tokenizer_dir)
    if kind == "wordpiece":
        vocab, rows = toks.wordpiece_vocab(dictionary)
        tok = toks.build_wordpiece(transformers, vocab, tokenizer_dir, model_name, max_len)
        return (
            EXPORTABLE[model_name][0],
            tok,
            rows,
            lambda out: (out / "vocab.txt").write_text("".join(f"{t}\n" for t in vocab), encoding="utf-8"),
        )
    if kind == "gpt2":
        return "roberta", toks.build_gpt2(transformers, dictionary, tokenizer_dir, max_len), None, lambda out: None
    tok = toks.build_sentencepiece(transformers, dictionary, tokenizer_dir, max_len)
    return "xlm-roberta", tok, None, lambda out: toks.copy_sentencepiece_if_aligned(dictionary, tokenizer_dir, out)


def check_logits(model, task, hf_model, head_name: str, hf_rows, n: int, max_len: int) -> dict:
    """max |fairseq - transformers| logits on the first n `valid` examples that fit the positions, fed as
    the same ids."""
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    # sentence_prediction's items are flat ("net_input.src_tokens"); its collater nests them
    items = [
        item for item in map(dataset.__getitem__, range(len(dataset))) if len(item["net_input.src_tokens"]) <= max_len
    ]
    if not items[:n]:
        raise SystemExit(
            f"no valid example of at most {max_len} tokens to check the export on; pass --check-examples 0"
        )
    src = dataset.collater(items[:n])["net_input"]["src_tokens"]
    pad = task.source_dictionary.pad()
    to_hf = torch.arange(len(task.source_dictionary))
    if hf_rows is not None:  # WordPiece: exported id j is fairseq row hf_rows[j]
        to_hf[torch.tensor(hf_rows)] = torch.arange(len(hf_rows))
    inputs = {"input_ids": to_hf[src], "attention_mask": src.ne(pad).long()}
    segments = getattr(model.encoder.sentence_encoder, "embed_segments", None)
    if segments is not None:
        inputs["token_type_ids"] = segments.segment_ids(src)
    with torch.no_grad():
        expect = model(src, features_only=True, classification_head_name=head_name)[0].float()
        got = hf_model(**inputs).logits.float()
    return {"examples": len(src), "split": "valid", "max_abs_diff": (got - expect).abs().max().item()}


def export(
    checkpoint: str | Path,
    output_dir: str | Path,
    data: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    head_name: str | None = None,
    check_examples: int = 8,
    tolerance: float = 1e-4,
) -> dict:
    """Write the transformers folder; returns the fairseq_export.json content."""
    transformers = require_transformers("exporting to transformers")
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise SystemExit(f"--output-dir {output_dir} exists and is not empty; choose a new folder")
    model, task, cfg, data_dir = load_finetuned(checkpoint, Path(data) if data else None)
    model_name = model_name_of(cfg)
    head_name = head_name or _get(cfg.task, "classification_head_name") or HEAD
    if head_name not in model.classification_heads:
        raise SystemExit(f"--head {head_name}: the checkpoint has heads {sorted(model.classification_heads)}")
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir(cfg, checkpoint)
    enc = model.encoder.sentence_encoder
    max_len = enc.embed_positions.weight.shape[0] - enc.embed_positions.padding_idx - 1
    family, tok, hf_rows, write_extra = build_tokenizer(
        transformers, model_name, task.source_dictionary, tokenizer_dir, max_len
    )
    check_input_layout(cfg, data_dir, family, checkpoint)
    head = model.classification_heads[head_name]
    labels = label_config(task, cfg, head.out_proj.out_features)
    config = hf_config(
        transformers, model, cfg, family, len(hf_rows or task.source_dictionary), tok.pad_token_id, labels
    )
    hf_model = getattr(transformers, FAMILIES[family][1])(config)
    hf_model.load_state_dict(hf_state(model, family, head_name, hf_rows), strict=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    write_extra(tmp)
    check: dict = {"examples": 0}
    if check_examples > 0:
        reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp)).eval()
        check = check_logits(model, task, reloaded, head_name, hf_rows, check_examples, max_len)
    if check_examples > 0 and not check["max_abs_diff"] <= tolerance:
        raise SystemExit(f"exported logits differ from fairseq's by {check['max_abs_diff']:.3g} > {tolerance}: {tmp}")
    meta = {
        "source_checkpoint": str(checkpoint),
        "fairseq_model": model_name,
        "transformers_class": FAMILIES[family][1],
        "head": head_name,
        "data": str(data_dir),
        "tokenizer_dir": str(tokenizer_dir),
        "check": check,
    }
    (tmp / "fairseq_export.json").write_text(json.dumps(meta, indent=2) + "\n")
    if output_dir.exists():
        output_dir.rmdir()
    tmp.replace(output_dir)
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m hf2fairseq.export",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("checkpoint", type=Path, help="fine-tuned fairseq checkpoint (checkpoint_best.pt)")
    parser.add_argument("--output-dir", type=Path, required=True, help="new folder for the transformers model")
    parser.add_argument("--data", type=Path, help="binarized data of the fine-tuning (default: the checkpoint's)")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer files of the model fine-tuning started from")
    parser.add_argument("--head", help=f"classification head to export (default: the task's, {HEAD})")
    parser.add_argument(
        "--check-examples", type=int, default=8, help="valid examples compared (default 8; 0: no check)"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| (default 1e-4)")
    args = parser.parse_args(argv)
    meta = export(
        args.checkpoint, args.output_dir, args.data, args.tokenizer_dir, args.head, args.check_examples, args.tolerance
    )
    check = meta["check"]
    checked = (
        f"logits on {check['examples']} {check['split']} examples within {check['max_abs_diff']:.2g} of fairseq's"
        if check["examples"]
        else "not checked (--check-examples 0)"
    )
    print(f"exported {args.checkpoint} -> {args.output_dir} ({meta['transformers_class']}); {checked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
