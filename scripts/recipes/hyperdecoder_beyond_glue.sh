#!/usr/bin/env bash
# Hyperdecoders beyond GLUE (issue 17) on GPUs: MRQA and the summarisation + NLI mixture, the Hyperdecoder and
# the baselines of the table, BART base or large.      usage: hyperdecoder_beyond_glue.sh SETTING MODEL SIZE
#   SETTING mrqa     DATA = python -m seq2seq_preprocess.mrqa output (mrqa-bin): train on the six in-domain sets
#                    (unbalanced), validate in-domain (valid) and out-of-domain (test) every epoch, 4 epochs
#                    (allenai/hyperdecoders configs/mrqa_experiments/unbalanced_manual_generated_mrqa.json)
#           mixture  DATA = python -m seq2seq_preprocess.mixture output (mixture-bin): 100k updates, validate
#                    every 5k (configs/xsum_nli/summarise_nli_*.json)
#   MODEL   hyperdecoder (manual encoder + generated decoder adapters; the reference's beyond-GLUE dims
#           512/36, hypernetwork 72) | hyperformer (task adapters, one task per batch, temperature 10;
#           reference task configs) | single_adapter (one adapter per layer, width matched to that
#           hyperdecoder's trainable count) | full (plain BART, every parameter trained)
#   SIZE    base | large (the reference used T5-base lm-adapt for both settings; large keeps its dims)
# Reference recipe: AdamW lr 3e-4 (eps 1e-8, wd 0), 500 warmup then linear decay, label smoothing 0.1, clip 1.0,
#   batch 128 (MRQA) / 64 (mixture) split over GPUs (the reference ran on one GPU), answers <= 64 tokens.
# Env: DATA, BART_PATH (bart.{base,large}/model.pt), NGPUS (>1: torchrun on one node), SLURM=1 (under sbatch:
#   srun, one task per node, GPUS_PER_NODE each), BSZ (total batch), LR, SAVE_DIR, EXTRA (more flags), PY,
#   DRY_RUN (print the flags and stop). Evaluate after training with scripts/hyperdecoder_eval.py.
#   sbatch --nodes 2 --ntasks-per-node 1 --gpus-per-node 8 --export ALL,SLURM=1,DATA=...,BART_PATH=... \
#     scripts/recipes/hyperdecoder_beyond_glue.sh mrqa hyperdecoder large
set -euo pipefail
SETTING=${1:?setting: mrqa | mixture}; MODEL=${2:?model: hyperdecoder | hyperformer | single_adapter | full}
SIZE=${3:?size: base | large}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:?set DATA to mrqa-bin or mixture-bin}; BART_PATH=${BART_PATH:?set BART_PATH to bart.$SIZE/model.pt}
PY=${PY:-python}; NGPUS=${NGPUS:-1}; SAVE_DIR=${SAVE_DIR:-checkpoints/hyperdecoder_${SETTING}_${MODEL}_${SIZE}}
case $SIZE in base|large) ;; *) echo "SIZE must be base or large, got '$SIZE'" >&2; exit 2 ;; esac

case $SETTING in
  mrqa)
    TASK=(--task hyperdecoder_mrqa --hyperdecoder-eval-mrqa --valid-subset valid,test
      --best-checkpoint-metric mrqa_f1 --maximize-best-checkpoint-metric --max-epoch 4)
    BSZ=${BSZ:-128}; EPOCHS=4
    # linear decay to 0 at the end of epoch 4: updates = 4 x ceil(train windows / batch)
    UPDATES=$("$PY" -c "import json, math, sys; n = json.load(open(sys.argv[1]))['splits']['train'];
print($EPOCHS * math.ceil(n / $BSZ))" "$DATA/tasks.json") ;;
  mixture)
    TASK=(--task hyperdecoder_text2text --hyperdecoder-eval-text2text --split-validation-test
      --best-checkpoint-metric t2t_avg --maximize-best-checkpoint-metric
      --validate-interval-updates 5000 --save-interval-updates 5000 --keep-interval-updates 1)
    BSZ=${BSZ:-64}; UPDATES=100000 ;;
  *) echo "SETTING must be mrqa or mixture, got '$SETTING'" >&2; exit 2 ;;
esac

GEN_DIMS=(--encoder-adapter-dim 512 --decoder-adapter-dim 36 --hypernetwork-bottleneck 72)
case $MODEL in
  hyperdecoder) ARCH=(--arch "hyperdecoder_bart_$SIZE" "${GEN_DIMS[@]}") ;;
  hyperformer)
    if [ "$SETTING" = mrqa ]; then DIMS=(50 50 100); NORM=(); else DIMS=(64 64 128); NORM=(--adapter-norm-input); fi
    ARCH=(--arch "hyperformer_bart_$SIZE" --encoder-adapter-dim "${DIMS[0]}" --decoder-adapter-dim "${DIMS[1]}"
      --hypernetwork-bottleneck "${DIMS[2]}" "${NORM[@]}")
    TASK+=(--one-task-per-batch --task-sampling-temperature 10) ;;
  single_adapter)
    WIDTH=$("$PY" -c "from hyperdecoder_src.models.baselines import single_adapter_width as w
print(w('$SIZE', encoder_adapter_dim=512, decoder_adapter_dim=36, hypernetwork_bottleneck=72))")
    ARCH=(--arch "single_adapter_bart_$SIZE" --encoder-adapter-dim "$WIDTH" --decoder-adapter-dim "$WIDTH") ;;
  full) ARCH=(--arch "bart_$SIZE") ;;
  *) echo "MODEL must be hyperdecoder, hyperformer, single_adapter or full, got '$MODEL'" >&2; exit 2 ;;
esac

WORLD=$NGPUS
if [ -n "${SLURM:-}" ]; then WORLD=$((SLURM_NNODES * ${GPUS_PER_NODE:-8})); fi
PER_GPU=$((BSZ / WORLD)); UPDATE_FREQ=1
if [ "$PER_GPU" -gt 32 ]; then UPDATE_FREQ=$((PER_GPU / 32)); PER_GPU=32; fi  # reference: 32 per device
ARGS=("$DATA" --user-dir "$REPO/robustft" --source-lang source --target-lang target "${TASK[@]}" "${ARCH[@]}"
  --restore-file "$BART_PATH" --reset-optimizer --reset-dataloader --reset-meters --reset-lr-scheduler
  --criterion label_smoothed_cross_entropy --label-smoothing 0.1
  --optimizer adam --adam-betas "(0.9,0.999)" --adam-eps 1e-08 --weight-decay 0.0 --clip-norm 1.0
  --lr "${LR:-3e-4}" --lr-scheduler polynomial_decay --warmup-updates 500 --total-num-update "$UPDATES"
  --max-update "$UPDATES" --batch-size "$PER_GPU" --update-freq "$UPDATE_FREQ" --required-batch-size-multiple 1
  --max-source-positions 1024 --max-target-positions 1024 --truncate-source --skip-invalid-size-inputs-valid-test
  --all-gather-list-size 131072 --no-epoch-checkpoints --save-dir "$SAVE_DIR" --log-format simple
  --log-interval 100 --fp16 ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${ARGS[@]}"; echo; exit 0; fi
mkdir -p "$SAVE_DIR"
if [ -n "${SLURM:-}" ]; then
  srun "$PY" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" --distributed-world-size "$WORLD" \
    --distributed-port "${PORT:-$((20000 + SLURM_JOB_ID % 10000))}" --ddp-backend legacy_ddp
elif [ "$NGPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NGPUS" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" \
    --ddp-backend legacy_ddp 2>&1 | tee "$SAVE_DIR/train.log"
else
  "$PY" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
fi
