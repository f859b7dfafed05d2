#!/usr/bin/env bash
# R3F beyond GLUE on GPUs (R3F paper Tables 3-4).   usage: seq2seq.sh DATASET METHOD [SEED]
#   Summarisation, BART-large: DATASET cnn_dm | xsum | gigaword | reddit_tifu | wikilingua,
#     METHOD r3f_seq2seq | vanilla_seq2seq (its twin).
#   XNLI zero-shot, XLM-R large: DATASET xnli, METHOD r3f | r4f | vanilla (its twin); the paper reports the
#     mean of 5 runs: for s in 1 2 3 4 5; do seq2seq.sh xnli r3f $s; done
# Data: DATA_ROOT/<dataset>-bin from `python -m seq2seq_preprocess` (BART: --tokenizer gpt2 with BART's
#   encoder.json, vocab.bpe, dict.txt; XLM-R: --tokenizer sentencepiece with its sentencepiece.bpe.model, dict.txt).
# Method flags come from the method registry (robustft_common/methods.py: SEQ2SEQ_METHODS for BART, METHODS
#   for XLM-R); the schedules are below. After training: scripts/seq2seq_eval.py (generation with BART's
#   decoding settings + ROUGE, or XNLI per-language accuracy) and scripts/seq2seq_report.py.
# Env: DATA_ROOT, MODEL_PATH (bart.large/model.pt or xlmr.large/model.pt), NGPUS (>1 = torchrun), SAVE_ROOT,
#   LR / UPDATES / UPDATE_FREQ (overrides), EXTRA (more flags), ARCH_ARGS (replace the architecture flags, e.g.
#   a smaller model), SCHEDULE (paper; tiny = the same flags on CPU without fp16, TINY_UPDATES (4) updates:
#   what tests/test_seq2seq_e2e.py runs), DRY_RUN (print the flags; scripts/recipes/slurm_multinode.sbatch).
set -euo pipefail
DATASET=${1:?dataset}; METHOD=${2:?method}; SEED=${3:-1}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DATA_ROOT=${DATA_ROOT:?set DATA_ROOT to the folder holding ${DATASET}-bin}
MODEL_PATH=${MODEL_PATH:?set MODEL_PATH to bart.large/model.pt or xlmr.large/model.pt}
NGPUS=${NGPUS:-1}; SAVE_ROOT=${SAVE_ROOT:-checkpoints}; PY=${PY:-python}
# METHOD_FLAGS, METHOD_FAMILY, METHOD_SCHEDULE (method registry); METHOD_TEXT: the same, passed in by a
# caller that has the registry imported (no Python start per run)
[ -n "${METHOD_TEXT:-}" ] || METHOD_TEXT=$("$PY" -m robustft_common.methods bash "$METHOD") || exit 2
eval "$METHOD_TEXT"
# fairseq silently trains from scratch when --restore-file does not exist: only the tiny CPU check may
if [ ! -f "$MODEL_PATH" ] && [ "${SCHEDULE:-paper}" != tiny ] && [ -z "${DRY_RUN:-}" ]; then
  echo "seq2seq.sh: MODEL_PATH $MODEL_PATH: no such file (the pretrained model.pt)" >&2; exit 2
fi

case $DATASET in
  # BART's summarisation recipe (fairseq examples/bart/README.summarization.md L48-80): CNN/DM and XSum as
  # published; Gigaword, Reddit TIFU, WikiLingua: not published by BART/R3F, CNN/DM's schedule (ours)
  cnn_dm|gigaword|reddit_tifu|wikilingua) KIND=summarization; D_UPD=20000; D_UF=4 ;;
  xsum) KIND=summarization; D_UPD=15000; D_UF=2 ;;
  # XNLI zero-shot: the RoBERTa MNLI schedule (glue.sh MNLI row: lr 1e-5, batch 32, 123,873 updates, 6% warmup)
  xnli) KIND=classification ;;
  *) echo "seq2seq.sh: unknown DATASET $DATASET (cnn_dm xsum gigaword reddit_tifu wikilingua xnli)" >&2; exit 2 ;;
esac
case $KIND/$METHOD_SCHEDULE in
  summarization/bart_summarization|classification/roberta_glue) ;;
  *) echo "seq2seq.sh: METHOD $METHOD does not fit $DATASET (summarisation: vanilla_seq2seq, r3f_seq2seq;" \
       "xnli: vanilla, r3f, r4f)" >&2; exit 2 ;;
esac

FP16=(--fp16 --fp16-init-scale 4 --threshold-loss-scale 1 --fp16-scale-window 128)
if [ $KIND = summarization ]; then
  UPD=${UPDATES:-$D_UPD}
  MODEL=(--arch bart_large)
  SCHED=(--task translation --source-lang source --target-lang target --truncate-source
    --max-source-positions 1024 --max-target-positions 1024 --layernorm-embedding
    --share-all-embeddings --share-decoder-input-output-embed --required-batch-size-multiple 1
    --max-tokens 2048 --update-freq "${UPDATE_FREQ:-$D_UF}" --dropout 0.1 --attention-dropout 0.1 --clip-norm 0.1
    --lr-scheduler polynomial_decay --lr "${LR:-3e-05}" --total-num-update "$UPD" --max-update "$UPD"
    --warmup-updates 500 --skip-invalid-size-inputs-valid-test --find-unused-parameters "${FP16[@]}")
else
  UPD=${UPDATES:-123873}
  MODEL=(--arch roberta_large --max-positions 512)
  SCHED=(--task sentence_prediction --num-classes 3 --init-token 0 --separator-token 2 --shorten-method truncate
    --valid-subset valid --best-checkpoint-metric accuracy --maximize-best-checkpoint-metric
    --required-batch-size-multiple 1 --max-tokens 4400 --batch-size 32 --max-epoch 10 --clip-norm 0.0
    --dropout 0.1 --attention-dropout 0.1 --lr-scheduler polynomial_decay --lr "${LR:-1e-05}"
    --total-num-update "$UPD" --max-update "$UPD" --warmup-updates $(( UPD * 6 / 100 )) --find-unused-parameters
    "${FP16[@]}")
fi
M=("${METHOD_FLAGS[@]}" "${SCHED[@]}")
case ${SCHEDULE:-paper} in
  paper) ;;
  tiny)  # the same flags less fp16 and the large-batch settings, on CPU, TINY_UPDATES updates
    TINY=()
    for ((i = 0; i < ${#M[@]}; i++)); do
      case ${M[i]} in
        --fp16|--find-unused-parameters) ;;
        --fp16-init-scale|--threshold-loss-scale|--fp16-scale-window|--update-freq) i=$((i + 1)) ;;
        --max-update|--total-num-update) TINY+=("${M[i]}" "${TINY_UPDATES:-4}"); i=$((i + 1)) ;;
        --warmup-updates) TINY+=("${M[i]}" 1); i=$((i + 1)) ;;
        *) TINY+=("${M[i]}") ;;
      esac
    done
    M=("${TINY[@]}" --cpu --num-workers 0) ;;
  *) echo "SCHEDULE must be paper or tiny, got '$SCHEDULE'" >&2; exit 2 ;;
esac
if [ -n "${ARCH_ARGS:-}" ]; then eval "MODEL=($ARCH_ARGS)"; fi

SAVE_DIR=$SAVE_ROOT/$DATASET/$METHOD/seed$SEED
ARGS=("$DATA_ROOT/$DATASET-bin" --user-dir "$REPO/robustft" "${MODEL[@]}"
  --restore-file "$MODEL_PATH" --reset-optimizer --reset-dataloader --reset-meters
  --seed "$SEED" --save-dir "$SAVE_DIR" --no-epoch-checkpoints --log-format json --log-interval 50
  "${M[@]}" ${EXTRA:-})
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${ARGS[@]}"; echo; exit 0; fi
mkdir -p "$SAVE_DIR"
if [ "$NGPUS" -gt 1 ]; then
  torchrun --standalone --nproc_per_node "$NGPUS" "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" \
    --ddp-backend legacy_ddp 2>&1 | tee "$SAVE_DIR/train.log"
else
  $PY "$REPO/scripts/fairseq_train.py" "${ARGS[@]}" 2>&1 | tee "$SAVE_DIR/train.log"
fi
