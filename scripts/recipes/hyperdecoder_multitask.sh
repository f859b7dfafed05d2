#!/usr/bin/env bash
# Hyperdecoder multi-task GLUE (one model, all tasks, text-to-text), the reference's glue_manual_generated setting:
# manual encoder adapters + generated decoder adapters (dim 64, hypernetwork bottleneck 128), frozen backbone,
# AdamW-like Adam lr 3e-4 eps 1e-8 wd 0, warmup 500, linear decay to 0 at 65536 updates, batch 128, length 128.
#   DATA=OUT/text2text-bin (python -m glue_preprocess --format text2text --tasks all ...), BART_PATH=bart.large/model.pt
#   NGPUS>1: torchrun on one node (the reference ran on a single GPU; batch is per GPU: scale BSZ down)
#   SPLIT_VALIDATION_TEST=1: the reference's split_validation_test: each valid_<task> is halved (seed 42), early
#   stopping sees the first half, scripts/hyperdecoder_eval.py --split test scores the held-out half
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA=${DATA:?set DATA to OUT/text2text-bin}; BART_PATH=${BART_PATH:?set BART_PATH to bart.large/model.pt}
NGPUS=${NGPUS:-1}; BSZ=${BSZ:-$((128 / NGPUS))}; SAVE_DIR=${SAVE_DIR:-checkpoints/hyperdecoder}; PY=${PY:-python}
VALID=${VALID:-$( (ls "$DATA" 2>/dev/null || true) | sed -n 's/^\(valid_[a-z0-9_]*\)\.src-tgt\.src\.idx$/\1/p' | paste -sd, -)}
ARGS=("$DATA" --user-dir "$REPO/robustft" --task hyperdecoder_glue --source-lang src --target-lang tgt
  --valid-subset "$VALID" --hyperdecoder-eval-glue --best-checkpoint-metric glue_avg --maximize-best-checkpoint-metric
  --arch hyperdecoder_bart_large --encoder-adapter manual --decoder-adapter generated
  --encoder-adapter-dim 64 --decoder-adapter-dim 64 --hypernetwork-bottleneck 128
  --restore-file "$BART_PATH" --reset-optimizer --reset-dataloader --reset-meters
  --criterion label_smoothed_cross_entropy --label-smoothing 0.0
  --optimizer adam --adam-betas "(0.9,0.999)" --adam-eps 1e-08 --weight-decay 0.0 --clip-norm 1.0
  --lr 3e-4 --lr-scheduler polynomial_decay --warmup-updates 500 --total-num-update 65536 --max-update 65536
  --batch-size "$BSZ" --required-batch-size-multiple 1 --max-source-positions 1024 --max-target-positions 1024
  --truncate-source --skip-invalid-size-inputs-valid-test --validate-interval-updates 2000 --save-interval-updates 2000
  --keep-interval-updates 1 --no-epoch-checkpoints --save-dir "$SAVE_DIR" --log-format simple --log-interval 100
  --fp16 ${SPLIT_VALIDATION_TEST:+--split-validation-test} ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${ARGS[@]}"; echo; exit 0; fi
mkdir -p "$SAVE_DIR"
if [ "$NGPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NGPUS" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" \
    --ddp-backend legacy_ddp 2>&1 | tee "$SAVE_DIR/train.log"
else
  $PY "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
fi
