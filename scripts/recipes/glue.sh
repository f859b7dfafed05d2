#!/usr/bin/env bash
# One GLUE task x method on GPUs, in each paper's setting.   usage: glue.sh TASK METHOD [SEED]
#   TASK: CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE     METHOD: vanilla r3f r4f hype hype_r3f pats sage noisytune
# Env: DATA_ROOT (folder with <TASK>-bin from glue_preprocess), ROBERTA_PATH (model.pt; default RoBERTa-large
#   from fairseq), ARCH (roberta_large), NGPUS (GPUs on this node; >1 = torchrun), SAVE_ROOT, LR (override),
#   EXTRA (more flags). Multi-node: scripts/recipes/slurm_multinode.sbatch. Settings: docs/recipes.md.
set -euo pipefail
TASK=${1:?task}; METHOD=${2:?method}; SEED=${3:-1}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA_ROOT=${DATA_ROOT:?set DATA_ROOT to the folder holding ${TASK}-bin}
ROBERTA_PATH=${ROBERTA_PATH:?set ROBERTA_PATH to roberta.large/model.pt (or a converted model.pt)}
ARCH=${ARCH:-roberta_large}; NGPUS=${NGPUS:-1}; SAVE_ROOT=${SAVE_ROOT:-checkpoints}
PY=${PY:-python}

# task: num_classes, train size N, RoBERTa recipe lr / batch / updates / warmup (fairseq README)
case $TASK in
  MNLI)  NC=3; N=392702; R_LR=1e-5; R_BSZ=32; R_UPD=123873; R_WU=7432;  METRIC="accuracy" ;;
  QNLI)  NC=2; N=104743; R_LR=1e-5; R_BSZ=32; R_UPD=33112;  R_WU=1986;  METRIC="accuracy" ;;
  QQP)   NC=2; N=363846; R_LR=1e-5; R_BSZ=32; R_UPD=113272; R_WU=28318; METRIC="accuracy --report-acc-and-f1" ;;
  RTE)   NC=2; N=2490;   R_LR=2e-5; R_BSZ=16; R_UPD=2036;   R_WU=122;   METRIC="accuracy" ;;
  SST-2) NC=2; N=67349;  R_LR=1e-5; R_BSZ=32; R_UPD=20935;  R_WU=1256;  METRIC="accuracy" ;;
  MRPC)  NC=2; N=3668;   R_LR=1e-5; R_BSZ=16; R_UPD=2296;   R_WU=137;   METRIC="f1 --report-acc-and-f1" ;;
  CoLA)  NC=2; N=8551;   R_LR=1e-5; R_BSZ=16; R_UPD=5336;   R_WU=320;   METRIC="mcc --report-mcc" ;;
  STS-B) NC=1; N=5749;   R_LR=2e-5; R_BSZ=16; R_UPD=3598;   R_WU=214;   METRIC="pearson --report-pearson-and-spearman --regression-target" ;;
  *) echo "unknown TASK $TASK" >&2; exit 2 ;;
esac
read -r BEST METRIC_FLAGS <<<"$METRIC"
ceil_div() { echo $(( ($1 + $2 - 1) / $2 )); }

# RoBERTa/R3F (fp16, Adam 0.9/0.98, wd 0.1, polynomial decay, 10 epochs, best dev checkpoint)
ROBERTA_OPT=(--optimizer adam --adam-betas "(0.9,0.98)" --adam-eps 1e-06 --weight-decay 0.1 --clip-norm 0.0
  --lr-scheduler polynomial_decay --lr "${LR:-$R_LR}" --total-num-update "$R_UPD" --warmup-updates "$R_WU"
  --max-update "$R_UPD" --max-epoch 10 --batch-size "$R_BSZ" --dropout 0.1 --attention-dropout 0.1
  --fp16 --fp16-init-scale 4 --threshold-loss-scale 1 --fp16-scale-window 128)
# HyPe (README): AdamW-like Adam 0.9/0.999 eps 1e-6 wd 0.01, clip 1.0, lr 2e-5, batch 16, 3 epochs, 10% warmup,
# linear decay, dropout 0 (attention 0.1), fp32 or --amp (fp16 rounds sigma=1e-5 noise away), last checkpoint
H_UPD=$(( 3 * $(ceil_div $N 16) )); H_WU=$(ceil_div $H_UPD 10)
HYPE_OPT=(--optimizer adam --adam-betas "(0.9,0.999)" --adam-eps 1e-06 --weight-decay 0.01 --clip-norm 1.0
  --lr-scheduler polynomial_decay --lr "${LR:-2e-5}" --total-num-update "$H_UPD" --warmup-updates "$H_WU"
  --max-update "$H_UPD" --max-epoch 3 --batch-size 16 --dropout 0.0 --attention-dropout 0.1 --pooler-dropout 0.0)
HYPE_NOISE=(--hype-type uniform --hype-eps 1e-5)
# PATS/SAGE (paper): Adamax, batch 32, 10 epochs, warmup 0.1, per-task lr from {1e-5 ... 5e-4} (Table 2; 1e-4 default)
P_UPD=$(( 10 * $(ceil_div $N 32) )); P_WU=$(ceil_div $P_UPD 10)
ADAMAX_SCHED=(--adamax-betas "(0.9,0.999)" --adamax-eps 1e-6 --weight-decay 0.01 --clip-norm 1.0
  --lr-scheduler polynomial_decay --lr "${LR:-1e-4}" --total-num-update "$P_UPD" --warmup-updates "$P_WU"
  --max-update "$P_UPD" --max-epoch 10 --batch-size 32 --dropout 0.1 --attention-dropout 0.1)
R3F=(--criterion sentence_prediction_r3f --r3f-lambda 0.7 --eps 1e-5 --noise-type uniform)
VANILLA=(--criterion hype_sentence_prediction --hype-type none)

case $METHOD in
  vanilla)   M=("${VANILLA[@]}" "${ROBERTA_OPT[@]}") ;;
  r3f)       M=("${R3F[@]}" "${ROBERTA_OPT[@]}") ;;
  r4f)       M=("${R3F[@]}" "${ROBERTA_OPT[@]}" --spectral-norm-classification-head --r4f-spectral-norm-dense) ;;
  hype)      M=(--criterion hype_sentence_prediction "${HYPE_NOISE[@]}" "${HYPE_OPT[@]}") ;;
  hype_r3f)  M=("${R3F[@]}" "${HYPE_NOISE[@]}" "${HYPE_OPT[@]}") ;;
  pats)      M=("${VANILLA[@]}" --optimizer adamax_pats --pats-noise 1e-6 --pats-beta 0.75 --pats-margin 5e-3 "${ADAMAX_SCHED[@]}") ;;
  sage)      M=("${VANILLA[@]}" --optimizer adamax_sage --sage-beta3 0.75 "${ADAMAX_SCHED[@]}") ;;
  noisytune) M=("${VANILLA[@]}" --optimizer adamax_pats --pats-noise 0 --noisytune-lambda 0.15 "${ADAMAX_SCHED[@]}") ;;
  *) echo "unknown METHOD $METHOD" >&2; exit 2 ;;
esac

SAVE_DIR=$SAVE_ROOT/$TASK/$METHOD/seed$SEED
mkdir -p "$SAVE_DIR"
ARGS=("$DATA_ROOT/$TASK-bin" --user-dir "$REPO/robustft" --task sentence_prediction --num-classes "$NC"
  --init-token 0 --separator-token 2 --max-positions 512 --shorten-method truncate --arch "$ARCH"
  --restore-file "$ROBERTA_PATH" --reset-optimizer --reset-dataloader --reset-meters
  --required-batch-size-multiple 1 --max-tokens 4400 --find-unused-parameters
  --best-checkpoint-metric "$BEST" --maximize-best-checkpoint-metric $METRIC_FLAGS
  --seed "$SEED" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --log-format simple --log-interval 50
  "${M[@]}" ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${ARGS[@]}"; echo; exit 0; fi
if [ "$NGPUS" -gt 1 ]; then
  # one process per GPU; scripts/fairseq_train.py turns torchrun's env into fairseq's distributed flags
  torchrun --standalone --nproc_per_node "$NGPUS" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" \
    --ddp-backend legacy_ddp 2>&1 | tee "$SAVE_DIR/train.log"
else
  $PY "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
fi
