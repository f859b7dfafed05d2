"""Paper-scale reproduction (robustft_experiments/paper_scale.py): each paper's plan runs glue.sh with the
paper's settings (asserted against shared/reference/{r3f,hype,pats}.md), the report computes ours in each
paper's convention (checked by hand on fake logs), and a tiny CPU run of one (task, method) per paper goes
end to end through glue.sh and fairseq to a report with our number next to the paper's."""

import json
import math
import random
import re
import shlex
from pathlib import Path

import pytest

from hf2fairseq.convert import arch_args
from robustft_common.methods import flag_value
from robustft_experiments import paper_scale

# GLUE train sizes (hype.md §2: RTE 2,490, MRPC 3,668, STS-B 5,749, CoLA 8,551)
TRAIN_SIZE = {"RTE": 2490, "MRPC": 3668, "STS-B": 5749, "CoLA": 8551}
BERT_LARGE = {
    "num_hidden_layers": 24,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "max_position_embeddings": 512,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "type_vocab_size": 2,
}
BERT_BASE = dict(BERT_LARGE, num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12)


def converted_folder(root: Path, config: dict) -> Path:
    """What `python -m hf2fairseq` writes, less the weights (a plan needs only convert.json)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "convert.json").write_text(json.dumps({"hf_config": config, "train_args": arch_args(config)}))
    return root


def plan_of(tmp_path, *argv):
    args = paper_scale.build_parser().parse_args(
        ["--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out"), "--dry-run", *argv]
    )
    paper_scale.check_args(args)
    return paper_scale.plan(args)


def value(flags, flag):
    return flag_value(flags, flag)  # the last occurrence: what argparse (and fairseq) uses


def by_run(runs):
    return {(r["task"], r["method"], r["seed"]): r for r in runs}


# ------------------------------------------------------------------------------------------ plans
def test_r3f_plan_is_table_2_in_the_roberta_glue_recipe(tmp_path):
    runs = plan_of(tmp_path, "--paper", "r3f", "--backbone", "roberta-large", "--pretrained", "rl/model.pt")
    # Table 2: seven GLUE tasks, STD / R3F / R4F, best and median of 10 seeds (r3f.md §4)
    assert {r["task"] for r in runs} == {"MNLI", "QQP", "QNLI", "SST-2", "CoLA", "MRPC", "RTE"}
    assert [r["method"] for r in runs[:3]] == ["vanilla", "r3f", "r4f"]
    assert len(runs) == 7 * 3 * 10 and {r["seed"] for r in runs} == set(range(1, 11))
    for r in runs:
        f = r["flags"]
        assert value(f, "--seed") == str(r["seed"]) and value(f, "--save-dir") == str(r["dir"])
        assert value(f, "--arch") == "roberta_large" and value(f, "--separator-token") == "2"
        # the fairseq RoBERTa/rxf recipe (r3f.md §2.3): fp16 with its loss-scale flags, Adam (0.9, 0.98) eps 1e-6,
        # wd 0.1, clip 0, polynomial decay, 10 epochs, dropout 0.1
        assert "--fp16" in f and (
            value(f, "--fp16-init-scale"),
            value(f, "--threshold-loss-scale"),
            value(f, "--fp16-scale-window"),
        ) == ("4", "1", "128")
        assert (
            value(f, "--optimizer"),
            value(f, "--adam-betas"),
            value(f, "--adam-eps"),
            value(f, "--weight-decay"),
            value(f, "--clip-norm"),
        ) == ("adam", "(0.9,0.98)", "1e-06", "0.1", "0.0")
        assert (value(f, "--lr-scheduler"), value(f, "--max-epoch"), value(f, "--dropout")) == (
            "polynomial_decay",
            "10",
            "0.1",
        )
        assert "--no-save" in f and not r["twin"]
    rte = by_run(runs)
    for method in ("r3f", "r4f"):
        f = rte[("RTE", method, 1)]["flags"]
        assert (value(f, "--criterion"), value(f, "--r3f-lambda"), value(f, "--eps"), value(f, "--noise-type")) == (
            "sentence_prediction_r3f",
            "0.7",
            "1e-05",
            "uniform",
        )  # README RTE recipe (r3f.md §2.3)
    assert "--spectral-norm-classification-head" in rte[("RTE", "r4f", 1)]["flags"]
    assert "--spectral-norm-classification-head" not in rte[("RTE", "r3f", 1)]["flags"]
    vanilla = rte[("RTE", "vanilla", 3)]["flags"]
    assert (value(vanilla, "--criterion"), value(vanilla, "--hype-type")) == ("hype_sentence_prediction", "none")
    # RoBERTa's rte.yaml: lr 2e-5, batch 16, 2036 updates, 122 warmup (hype.md §3)
    assert (
        value(vanilla, "--lr"),
        value(vanilla, "--batch-size"),
        value(vanilla, "--max-update"),
        value(vanilla, "--warmup-updates"),
    ) == ("2e-5", "16", "2036", "122")


def test_hype_plan_runs_the_readme_schedule_with_a_vanilla_twin(tmp_path):
    bert = converted_folder(tmp_path / "bert-large", BERT_LARGE)
    runs = plan_of(tmp_path, "--paper", "hype", "--backbone", "bert-large", "--pretrained", str(bert))
    # Table 1: CoLA, MRPC, RTE, STS-B; vanilla, HyPe-N, HyPe-U; mean of 3 seeds (hype.md §5, §1.4)
    assert {r["task"] for r in runs} == set(TRAIN_SIZE) and len(runs) == 4 * 3 * 3
    assert {r["method"] for r in runs} == {"vanilla", "hype_n", "hype_u"} and {r["seed"] for r in runs} == {1, 2, 3}
    for r in runs:
        f = r["flags"]
        # converted BERT: the converter's architecture flags, BERT's [CLS] A [SEP] B [SEP] (no separator token)
        assert value(f, "--arch") == "hf_bert" and value(f, "--encoder-layers") == "24" and "--separator-token" not in f
        assert value(f, "--restore-file") == str(bert / "model.pt")
        # README command + transformers 4.7 Trainer (hype.md §2): AdamW (0.9, 0.999) eps 1e-6, wd 0.01, clip 1,
        # lr 2e-5, batch 16, 3 epochs, warmup ceil(0.1 total), fp32
        total = 3 * math.ceil(TRAIN_SIZE[r["task"]] / 16)
        assert (
            value(f, "--adam-betas"),
            value(f, "--adam-eps"),
            value(f, "--weight-decay"),
            value(f, "--clip-norm"),
            value(f, "--lr"),
            value(f, "--batch-size"),
            value(f, "--max-epoch"),
        ) == ("(0.9,0.999)", "1e-06", "0.01", "1.0", "2e-5", "16", "3")
        assert (int(value(f, "--max-update")), int(value(f, "--warmup-updates"))) == (total, math.ceil(total / 10))
        assert "--fp16" not in f and value(f, "--attention-dropout") == "0.1"
        # HyPe turns dropout off (README --dropout_rate 0.0, head dropout too); vanilla keeps 0.1
        dropout = "0.1" if r["method"] == "vanilla" else "0.0"
        assert (value(f, "--dropout"), value(f, "--pooler-dropout")) == (dropout, dropout)
        assert r["twin"] == (r["method"] == "vanilla")
    rte = by_run(runs)
    assert (
        int(value(rte[("RTE", "vanilla", 1)]["flags"], "--max-update")),
        int(value(rte[("CoLA", "vanilla", 1)]["flags"], "--max-update")),
    ) == (468, 1605)  # hype.md §2
    assert value(rte[("RTE", "vanilla", 1)]["flags"], "--hype-type") == "none"
    assert (
        value(rte[("RTE", "hype_n", 1)]["flags"], "--hype-type"),
        value(rte[("RTE", "hype_n", 1)]["flags"], "--hype-eps"),
    ) == ("normal", "1e-05")
    assert (value(rte[("RTE", "hype_u", 2)]["flags"], "--hype-uniform")) == "symmetric"  # paper's U(-eps, eps)


def test_pats_plan_is_adamax_batch_32_ten_epochs_five_seeds(tmp_path):
    bert = converted_folder(tmp_path / "bert-base", BERT_BASE)
    runs = plan_of(
        tmp_path, "--paper", "pats", "--backbone", "bert-base", "--pretrained", str(bert), "--lr", "RTE=2e-5"
    )
    assert {r["task"] for r in runs} == {"CoLA", "MRPC", "RTE", "STS-B", "QQP", "QNLI", "MNLI", "SST-2"}
    assert {r["method"] for r in runs} == {"vanilla_adamax", "noisytune", "sage", "pats"}
    assert {r["seed"] for r in runs} == {1, 2, 3, 4, 5} and len(runs) == 8 * 4 * 5
    optimizers = {"vanilla_adamax": "adamax", "noisytune": "adamax_pats", "sage": "adamax_sage", "pats": "adamax_pats"}
    for r in runs:
        f = r["flags"]
        # pats.md §1.5 / §2: Adamax (0.9, 0.999), e 1e-6, no bias correction, wd 0.01, batch 32, 10 epochs,
        # warmup 0.1, global clip 1.0, lr from the grid {1e-5 ... 5e-4}; SAGE's code has no fp16
        assert value(f, "--optimizer") == optimizers[r["method"]]
        assert (
            value(f, "--adamax-betas"),
            value(f, "--adamax-eps"),
            value(f, "--weight-decay"),
            value(f, "--batch-size"),
            value(f, "--max-epoch"),
            value(f, "--clip-norm"),
        ) == ("(0.9,0.999)", "1e-06", "0.01", "32", "10", "1.0")
        assert "--no-bias-correction" in f and "--fp16" not in f
        assert value(f, "--lr") == ("2e-5" if r["task"] == "RTE" else "1e-4")
        if r["task"] in TRAIN_SIZE:
            total = 10 * math.ceil(TRAIN_SIZE[r["task"]] / 32)
            assert (int(value(f, "--max-update")), int(value(f, "--warmup-updates"))) == (total, math.ceil(total / 10))
    rte = by_run(runs)
    assert (
        value(rte[("RTE", "pats", 1)]["flags"], "--pats-noise"),
        value(rte[("RTE", "pats", 1)]["flags"], "--pats-beta"),
    ) == ("1e-06", "0.75")
    assert value(rte[("RTE", "noisytune", 1)]["flags"], "--noisytune-lambda") == "0.15"
    assert value(rte[("RTE", "sage", 1)]["flags"], "--sage-beta3") == "0.75"


def test_several_gpus_per_run_keep_the_papers_total_batch(tmp_path):
    runs = plan_of(
        tmp_path,
        "--paper",
        "r3f",
        "--backbone",
        "roberta-large",
        "--pretrained",
        "m.pt",
        "--tasks",
        "RTE",
        "--methods",
        "r3f",
        "--seeds",
        "1",
        "--launcher",
        "torchrun",
        "--ngpus",
        "2",
    )
    assert len(runs) == 1 and runs[0]["env"]["NGPUS"] == "2"
    assert value(runs[0]["flags"], "--batch-size") == "8"  # fairseq's batch is per GPU: 2 x 8 = the recipe's 16
    with pytest.raises(SystemExit, match="--ngpus 3"):
        plan_of(
            tmp_path,
            "--paper",
            "r3f",
            "--backbone",
            "roberta-large",
            "--pretrained",
            "m.pt",
            "--tasks",
            "RTE",
            "--methods",
            "r3f",
            "--seeds",
            "1",
            "--launcher",
            "torchrun",
            "--ngpus",
            "3",
        )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--paper", "hype", "--backbone", "bert-base"], "--backbone bert-base"),
        (["--paper", "r3f", "--backbone", "roberta-large", "--tasks", "STS-B"], "--tasks: STS-B not in this paper"),
        (["--paper", "pats", "--backbone", "roberta-large", "--methods", "r3f"], "--methods: r3f not in this paper"),
        (["--paper", "hype", "--backbone", "bert-large"], "needs a folder written by hf2fairseq"),
    ],
)
def test_bad_requests_name_the_flag(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        plan_of(tmp_path, "--pretrained", str(tmp_path), *argv)


def test_slurm_array_writes_one_job_per_run_and_a_report_after_them(tmp_path):
    (tmp_path / "data" / "RTE-bin").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(b"")
    out = tmp_path / "out"
    assert (
        paper_scale.main(
            [
                "--paper",
                "r3f",
                "--backbone",
                "roberta-large",
                "--data-root",
                str(tmp_path / "data"),
                "--pretrained",
                str(tmp_path / "model.pt"),
                "--output-dir",
                str(out),
                "--tasks",
                "RTE",
                "--seeds",
                "1,2",
                "--launcher",
                "slurm-array",
                "--ngpus",
                "2",
            ]
        )
        == 0
    )
    jobs = (out / "jobs.txt").read_text().splitlines()
    assert len(jobs) == 2 * 3
    for i, line in enumerate(jobs):
        argv = shlex.split(line)
        assert argv[argv.index("--only-run") + 1] == str(i) and "--no-report" in argv
        assert argv[argv.index("--launcher") + 1] == "torchrun" and argv[argv.index("--ngpus") + 1] == "2"
    sbatch = (out / "paper_scale.sbatch").read_text()
    assert "#SBATCH --array=0-5" in sbatch and "#SBATCH --gpus-per-node=2" in sbatch
    submit = (out / "submit.sh").read_text()
    assert "--dependency=afterany:" in submit and "--report-only" in submit
    assert not (out / "runs").exists()  # nothing ran, not even a dry run's folders


# ------------------------------------------------------------------------------------------ report
def fake_run(out: Path, task, method, seed, metric, values, status="ok"):
    run = out / "runs" / task / method / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    lines = [
        f"[{task}] | INFO | valid | epoch {i + 1:03d} | valid on 'valid' subset | loss 0.7 | {metric} {v} | "
        f"num_updates {10 * (i + 1)}"
        for i, v in enumerate(values)
    ]
    (run / "train.log").write_text("\n".join(lines) + "\n")
    (run / "status.json").write_text(json.dumps({"status": status, "returncode": 0 if status == "ok" else 1}))


def row(text, task, label):
    return next(line for line in text.splitlines() if line.startswith(f"| {task} (") and f"| {label} |" in line)


def test_r3f_report_best_and_median_of_each_runs_best_validation(tmp_path):
    # each run: three validations, the best in the middle (best != last)
    for seed, best in enumerate((86.2, 84.1, 87.3, 85.0), 1):
        fake_run(tmp_path, "RTE", "vanilla", seed, "accuracy", [best - 5, best, best - 1])
    for seed, best in enumerate((88.0, 87.1, 89.2, 86.5), 1):
        fake_run(tmp_path, "RTE", "r3f", seed, "accuracy", [best - 3, best, best - 0.5])
    # MRPC: R3F reports accuracy, not the task table's F1
    fake_run(tmp_path, "MRPC", "r3f", 1, "accuracy", [80.0, 90.0])
    text = paper_scale.write_report(tmp_path, "r3f", "roberta-large")
    # by hand: vanilla best 87.3 (paper 86.6), median (85.0 + 86.2) / 2 = 85.6 (paper 86.6), mean 85.65,
    # sample std sqrt(5.85 / 3) = 1.40
    assert row(text, "RTE", "Vanilla").split(" | ")[2:9] == [
        "85.65 ± 1.40 (n=4)",
        "87.30",
        "86.60",
        "+0.70",
        "85.60",
        "86.60",
        "-1.00",
    ]
    # r3f best 89.2 (paper 88.5), median (87.1 + 88.0) / 2 = 87.55 (paper 88.4); gain in best: ours 89.2 - 87.3,
    # paper 88.5 - 86.6; paired per seed: 1.8, 3.0, 1.9, 1.5 -> mean 2.05, sd 0.6557, t(0.975, 3) 3.1824: +-1.04
    r3f = row(text, "RTE", "R3F").rstrip(" |").split(" | ")
    assert r3f[2:9] == ["87.70 ± 1.17 (n=4)", "89.20", "88.50", "+0.70", "87.55", "88.40", "-0.85"]
    assert r3f[9:] == ["+1.90 / +1.90", "+2.05 [+1.01, +3.09], wins 4/4"]
    mrpc = row(text, "MRPC", "R3F").split(" | ")
    assert mrpc[0] == "| MRPC (accuracy)" and mrpc[3:6] == ["90.00", "91.60", "-1.60"]
    assert "status: **verified**" in text
    saved = json.loads((tmp_path / "paper_scale.json").read_text())
    cell = next(c for c in saved["summary"] if (c["task"], c["method"]) == ("RTE", "r3f"))
    assert cell["ours"] == {"best": 89.2, "median": pytest.approx(87.55)} and cell["paper"] == {
        "best": 88.5,
        "median": 88.4,
    }


def test_hype_report_mean_of_the_last_validation_and_the_averages(tmp_path):
    last = {
        "hype_n": {"CoLA": (65.0, 67.0), "MRPC": (91.0, 92.0), "RTE": (74.0, 75.0), "STS-B": (90.0, 90.4)},
        "vanilla": {"CoLA": (60.0, 63.0), "MRPC": (90.0, 90.0), "RTE": (70.0, 72.0), "STS-B": (89.0, 89.2)},
    }
    metric = {"CoLA": "mcc", "MRPC": "f1", "RTE": "accuracy", "STS-B": "pearson"}
    for method, tasks in last.items():
        for task, values in tasks.items():
            for seed, v in enumerate(values, 1):
                fake_run(tmp_path, task, method, seed, metric[task], [v + 9, v])  # the best is not the last
    fake_run(tmp_path, "RTE", "hype_u", 1, "accuracy", [], status="failed")
    text = paper_scale.write_report(tmp_path, "hype", "bert-large")
    # CoLA HyPe-N: mean of the last values (65 + 67) / 2 = 66.00, paper 66.26; gain over vanilla 66 - 61.5 (no
    # published vanilla per task); paired 5, 4: mean 4.5, sd 0.7071, t(0.975, 1) 12.706 -> +-6.35
    assert row(text, "CoLA", "HyPe-N").rstrip(" |").split(" | ")[2:] == [
        "66.00 ± 1.41 (n=2)",
        "66.26",
        "-0.26",
        "+4.50 / –",
        "+4.50 [-1.85, +10.85], wins 2/2",
    ]
    assert "1 failed" in row(text, "RTE", "HyPe-U")
    # averages over the 4 tasks: HyPe-N (66 + 91.5 + 74.5 + 90.2) / 4 = 80.55 vs 80.75; vanilla
    # (61.5 + 90 + 71 + 89.1) / 4 = 77.90 vs 79.15 (derived)
    avg = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if "| average |" in line}
    assert avg["| HyPe-N"][2:5] == ["80.55", "80.75", "-0.20"] and avg["| Vanilla"][2:5] == ["77.90", "79.15", "-1.25"]
    assert "| HyPe-U | average | – | 80.60 |" in text  # a task without a value: no average
    assert "status: **unverified**" in text


def test_pats_report_mean_of_five_seeds(tmp_path):
    for seed, best in enumerate((72.0, 73.0, 71.5, 72.5, 74.0), 1):
        fake_run(tmp_path, "RTE", "pats", seed, "accuracy", [best - 2, best, best - 1])
    text = paper_scale.write_report(tmp_path, "pats", "roberta-large")
    # mean 72.6 vs 86.29 (RoBERTa-large); sample std sqrt(3.7 / 4) = 0.96
    assert row(text, "RTE", "PATS").split(" | ")[2:5] == ["72.60 ± 0.96 (n=5)", "86.29", "-13.69"]
    assert row(text, "CoLA", "PATS").split(" | ")[2:5] == ["–", "68.62", "–"]


# ------------------------------------------------------------------------------------------ tiny CPU runs
WORDS = [f"w{i}" for i in range(40)]


def write_glue(root: Path, task: str, n_train=32, n_dev=8, seed=0):
    """A few rows of a GLUE task in its file layout (robustft_common/glue_tasks.py)."""
    rng = random.Random(seed)

    def sent():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))

    folder = root / task
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        if task == "RTE":
            rows = ["index\tsentence1\tsentence2\tlabel"] + [
                f"{i}\t{sent()}\t{sent()}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)
            ]
        elif task == "CoLA":
            rows = [f"src\t{rng.randint(0, 1)}\t\t{sent()}" for _ in range(n)]
        else:  # MRPC
            rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
                f"{rng.randint(0, 1)}\t{i}\t{i + 1000}\t{sent()}\t{sent()}" for i in range(n)
            ]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer / dim-64 BERT converted twice (hf_bert for the BERT backbones, roberta_base as a stand-in
    RoBERTa model.pt) and RTE / CoLA / MRPC binarized with its vocabulary."""
    import torch
    import transformers

    from glue_preprocess import preprocess
    from hf2fairseq.convert import convert

    root = tmp_path_factory.mktemp("paper_scale")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(str(root / "hf"))
    (root / "hf" / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
    convert(root / "hf", root / "bert")
    roberta = convert(root / "hf", root / "roberta", arch="roberta_base")
    for task in ("RTE", "CoLA", "MRPC"):
        write_glue(root / "glue", task)
    preprocess(
        glue_dir=str(root / "glue"),
        tasks=["RTE", "CoLA", "MRPC"],
        output_dir=str(root / "data"),
        tokenizer="wordpiece",
        wordpiece_vocab=str(root / "bert" / "vocab.txt"),
        srcdict=str(root / "bert" / "dict.txt"),
        log=lambda *a, **k: None,
    )
    return {"root": root, "roberta_args": shlex.join(roberta["train_args"])}


def logged(run_dir: Path, metric: str):
    """The metric of every validation in a fairseq simple-format log, read independently of the report code."""
    text = (run_dir / "train.log").read_text()
    return [float(m.group(1)) for m in re.finditer(rf"valid on 'valid' subset \|.*?\| {metric} ([-\d.]+) \|", text)]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "paper,backbone,task,method,metric,paper_value",
    [
        ("r3f", "roberta-large", "RTE", "r3f", "accuracy", "88.50"),
        ("hype", "bert-large", "CoLA", "hype_n", "mcc", "66.26"),
        ("pats", "bert-base", "MRPC", "pats", "f1", "91.05"),
    ],
)
def test_tiny_cpu_run_end_to_end(tiny, paper, backbone, task, method, metric, paper_value, capsys):
    root, out = tiny["root"], tiny["root"] / f"out_{paper}"
    model = (
        ["--pretrained", str(root / "roberta" / "model.pt"), "--arch-args", tiny["roberta_args"]]
        if backbone == "roberta-large"
        else ["--pretrained", str(root / "bert")]
    )
    argv = [
        "--paper",
        paper,
        "--backbone",
        backbone,
        "--data-root",
        str(root / "data"),
        "--output-dir",
        str(out),
        "--tasks",
        task,
        "--methods",
        method,
        "--seeds",
        "1",
        "--schedule",
        "tiny",
        "--quiet",
        *model,
    ]
    assert paper_scale.main(argv) == 0
    run = out / "runs" / task / method / "seed1"
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    command = json.loads((run / "command.json").read_text())
    f = command["fairseq_train_args"]
    # the paper's flags on CPU: no fp16, the tiny update count, the tiny model's architecture
    assert (
        "--cpu" in f and "--fp16" not in f and value(f, "--max-update") == "4" and value(f, "--encoder-layers") == "2"
    )
    assert ("--separator-token" in f) == (backbone == "roberta-large")
    values = logged(run, metric)
    assert values, (run / "train.log").read_text()[-3000:]
    ours = max(values) if paper != "hype" else values[-1]  # R3F / PATS: best validation; HyPe: the last
    text = (out / "paper_scale.md").read_text()
    cells = row(text, task, paper_scale.get_method(method).label).split(" | ")
    assert "Not a reproduction" in text
    if paper == "r3f":
        assert cells[2:6] == [f"{ours:.2f} (n=1)", f"{ours:.2f}", paper_value, f"{ours - float(paper_value):+.2f}"]
    else:
        assert cells[2:5] == [f"{ours:.2f} (n=1)", paper_value, f"{ours - float(paper_value):+.2f}"]
    # restartable: the same command again runs nothing
    capsys.readouterr()
    assert paper_scale.main(argv) == 0
    assert "ok, skipped (restartable)" in capsys.readouterr().out
