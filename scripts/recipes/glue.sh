#!/usr/bin/env bash
# One GLUE task x method on GPUs, in each paper's setting.   usage: glue.sh TASK METHOD [SEED]
#   TASK: CoLA SST-2 MRPC STS-B QQP MNLI QNLI RTE   METHOD: any of `python -m robustft_common.methods list`
# The method's flags come from the method registry (robustft_common/methods.py), the task's classes and
# metric flags from the GLUE task table (robustft_common/glue_tasks.py); the schedule of the paper each
# method comes from (its recipe's "schedule") is below.
# Env: DATA_ROOT (folder with <TASK>-bin from glue_preprocess), ROBERTA_PATH (model.pt; default RoBERTa-large
#   from fairseq), ARCH (roberta_large), NGPUS (GPUs on this node; >1 = torchrun), SAVE_ROOT, LR (override),
#   EXTRA (more flags). Multi-node: scripts/recipes/slurm_multinode.sbatch. Settings: docs/recipes.md.
# Env for other backbones and checks (benchmarks/quality/paper_scale.py sets them): ARCH_ARGS (a converted
#   checkpoint's architecture flags, convert.json `train_args` of `python -m hf2fairseq`; replace `--arch ARCH
#   --max-positions 512`), SEPARATOR_TOKEN (2 = RoBERTa's <s> A </s></s> B </s>; none = BERT's [CLS] A [SEP] B
#   [SEP]), RECIPE_SCHEDULE (run METHOD in another paper's schedule: a baseline's twin, e.g. vanilla in
#   hype_readme), SCHEDULE (paper; tiny = the same flags as a CPU check: --cpu, no fp16, TINY_UPDATES (4)
#   updates), TASK_FLAGS_TEXT / METHOD_TEXT (the two table look-ups below, passed in by a caller that has the
#   tables imported: no Python start per run).
set -euo pipefail
TASK=${1:?task}; METHOD=${2:?method}; SEED=${3:-1}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA_ROOT=${DATA_ROOT:?set DATA_ROOT to the folder holding ${TASK}-bin}
ROBERTA_PATH=${ROBERTA_PATH:?set ROBERTA_PATH to roberta.large/model.pt (or a converted model.pt)}
ARCH=${ARCH:-roberta_large}; NGPUS=${NGPUS:-1}; SAVE_ROOT=${SAVE_ROOT:-checkpoints}
PY=${PY:-python}

# --num-classes, --regression-target, --report-*, --best-checkpoint-metric (GLUE task table)
[ -n "${TASK_FLAGS_TEXT:-}" ] || TASK_FLAGS_TEXT=$("$PY" -m robustft_common.glue_tasks flags "$TASK") || exit 2
eval "TASK_FLAGS=($TASK_FLAGS_TEXT)"
# METHOD_FLAGS (array), METHOD_FAMILY, METHOD_SCHEDULE (method registry)
[ -n "${METHOD_TEXT:-}" ] || METHOD_TEXT=$("$PY" -m robustft_common.methods bash "$METHOD") || exit 2
eval "$METHOD_TEXT"

# task: train size N, RoBERTa recipe lr / batch / updates / warmup (fairseq examples/roberta README)
case $TASK in
  MNLI)  N=392702; R_LR=1e-5; R_BSZ=32; R_UPD=123873; R_WU=7432  ;;
  QNLI)  N=104743; R_LR=1e-5; R_BSZ=32; R_UPD=33112;  R_WU=1986  ;;
  QQP)   N=363846; R_LR=1e-5; R_BSZ=32; R_UPD=113272; R_WU=28318 ;;
  RTE)   N=2490;   R_LR=2e-5; R_BSZ=16; R_UPD=2036;   R_WU=122   ;;
  SST-2) N=67349;  R_LR=1e-5; R_BSZ=32; R_UPD=20935;  R_WU=1256  ;;
  MRPC)  N=3668;   R_LR=1e-5; R_BSZ=16; R_UPD=2296;   R_WU=137   ;;
  CoLA)  N=8551;   R_LR=1e-5; R_BSZ=16; R_UPD=5336;   R_WU=320   ;;
  STS-B) N=5749;   R_LR=2e-5; R_BSZ=16; R_UPD=3598;   R_WU=214   ;;
  *) echo "no RoBERTa recipe schedule for TASK $TASK" >&2; exit 2 ;;
esac
ceil_div() { echo $(( ($1 + $2 - 1) / $2 )); }

# Schedules: applied after the method's flags, so where a paper trained with other optimizer settings
# than the method's family (HyPe) the paper's win here.
# roberta_glue: RoBERTa/R3F (fp16, polynomial decay, 10 epochs, best dev checkpoint; optimizer = registry's)
ROBERTA_OPT=(--clip-norm 0.0
  --lr-scheduler polynomial_decay --lr "${LR:-$R_LR}" --total-num-update "$R_UPD" --warmup-updates "$R_WU"
  --max-update "$R_UPD" --max-epoch 10 --batch-size "$R_BSZ" --dropout 0.1 --attention-dropout 0.1
  --fp16 --fp16-init-scale 4 --threshold-loss-scale 1 --fp16-scale-window 128)
# hype_readme (HyPe README): AdamW-like Adam 0.9/0.999 eps 1e-6 wd 0.01, clip 1.0, lr 2e-5, batch 16, 3 epochs, 10% warmup,
# linear decay, dropout 0 (attention 0.1), fp32 or --amp (fp16 rounds sigma=1e-5 noise away), last checkpoint
H_UPD=$(( 3 * $(ceil_div $N 16) )); H_WU=$(ceil_div $H_UPD 10)
HYPE_OPT=(--optimizer adam --adam-betas "(0.9,0.999)" --adam-eps 1e-06 --weight-decay 0.01 --clip-norm 1.0
  --lr-scheduler polynomial_decay --lr "${LR:-2e-5}" --total-num-update "$H_UPD" --warmup-updates "$H_WU"
  --max-update "$H_UPD" --max-epoch 3 --batch-size 16 --dropout 0.0 --attention-dropout 0.1 --pooler-dropout 0.0)
# pats_adamax (PATS/SAGE papers): batch 32, 10 epochs, warmup 0.1, clip 1.0, per-task lr from {1e-5 ... 5e-4}
# (Table 2; 1e-4 default); the Adamax settings (mt-dnn's) are the registry's
P_UPD=$(( 10 * $(ceil_div $N 32) )); P_WU=$(ceil_div $P_UPD 10)
ADAMAX_SCHED=(--clip-norm 1.0
  --lr-scheduler polynomial_decay --lr "${LR:-1e-4}" --total-num-update "$P_UPD" --warmup-updates "$P_WU"
  --max-update "$P_UPD" --max-epoch 10 --batch-size 32 --dropout 0.1 --attention-dropout 0.1)
case ${RECIPE_SCHEDULE:-$METHOD_SCHEDULE} in
  roberta_glue) M=("${METHOD_FLAGS[@]}" "${ROBERTA_OPT[@]}") ;;
  hype_readme)  M=("${METHOD_FLAGS[@]}" "${HYPE_OPT[@]}") ;;
  pats_adamax)  M=("${METHOD_FLAGS[@]}" "${ADAMAX_SCHED[@]}") ;;
  *) echo "method $METHOD: no schedule for recipe schedule '${RECIPE_SCHEDULE:-$METHOD_SCHEDULE}'" >&2; exit 2 ;;
esac
# SCHEDULE=tiny: the paper's flags less fp16, on CPU, TINY_UPDATES updates (tests/test_paper_scale.py runs this)
case ${SCHEDULE:-paper} in
  paper) ;;
  tiny)
    TINY=()
    for ((i = 0; i < ${#M[@]}; i++)); do
      case ${M[i]} in
        --fp16) ;;
        --fp16-init-scale|--threshold-loss-scale|--fp16-scale-window) i=$((i + 1)) ;;
        --max-update|--total-num-update) TINY+=("${M[i]}" "${TINY_UPDATES:-4}"); i=$((i + 1)) ;;
        --warmup-updates) TINY+=("${M[i]}" 1); i=$((i + 1)) ;;
        *) TINY+=("${M[i]}") ;;
      esac
    done
    M=("${TINY[@]}" --cpu --num-workers 0) ;;
  *) echo "SCHEDULE must be paper or tiny, got '$SCHEDULE'" >&2; exit 2 ;;
esac
if [ -n "${ARCH_ARGS:-}" ]; then eval "MODEL=($ARCH_ARGS)"; else MODEL=(--arch "$ARCH" --max-positions 512); fi
SEP=(--separator-token "${SEPARATOR_TOKEN:-2}"); [ "${SEPARATOR_TOKEN:-2}" != none ] || SEP=()

SAVE_DIR=$SAVE_ROOT/$TASK/$METHOD/seed$SEED
ARGS=("$DATA_ROOT/$TASK-bin" --user-dir "$REPO/robustft" --task sentence_prediction
  --init-token 0 "${SEP[@]}" --shorten-method truncate "${MODEL[@]}"
  --restore-file "$ROBERTA_PATH" --reset-optimizer --reset-dataloader --reset-meters
  --required-batch-size-multiple 1 --max-tokens 4400 --find-unused-parameters "${TASK_FLAGS[@]}"
  --seed "$SEED" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --log-format simple --log-interval 50
  "${M[@]}" ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${ARGS[@]}"; echo; exit 0; fi
mkdir -p "$SAVE_DIR"  # not on a dry run: printing the flags writes nothing
if [ "$NGPUS" -gt 1 ]; then
  # one process per GPU; scripts/fairseq_train.py turns torchrun's env into fairseq's distributed flags
  torchrun --standalone --nproc_per_node "$NGPUS" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" \
    --ddp-backend legacy_ddp 2>&1 | tee "$SAVE_DIR/train.log"
else
  $PY "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
fi
