#!/usr/bin/env bash
# Issue 19 evidence: the CPU-size ConvNeXt V2 (preset convnextv2-demo) pretrained on Fashion-MNIST with sparse masking
# and with SimMIM's token masking (same steps, same recipe, same conv decoder: only `conv_masking` differs), then
# 1,000-label fine-tuning of both and of the same architecture from random init, scored on the full test set (the
# protocol of scripts/reproduce_results.sh). Writes benchmarks/convnet_evidence.md (tables), convnet_loss.png and the
# reconstruction pictures via scripts/convnet_evidence_report.py. Finished runs and evaluations are reused.
#
#   STEPS=500 SEEDS="0 1" bash scripts/convnet_evidence.sh   # OUT=runs/convnet-evidence DATA=runs/demo-data
#
# Each fine-tune runs once per seed in SEEDS (subset, head and fine-tuning order change; the pretrained weights
# do not), so the spread between seeds says which differences are noise.
# The two pretrainings run side by side, then the three fine-tunes, one torch thread each (THREADS), which suits
# a 2-core machine; set THREADS higher on a bigger one.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-500}
OUT=${OUT:-runs/convnet-evidence}
DATA=${DATA:-runs/demo-data}
THREADS=${THREADS:-1}
SEEDS=${SEEDS:-0 1}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$OUT/eval"
if ! ls "$DATA"/*.tar > /dev/null 2>&1; then
  python scripts/prepare_data.py --source fashion-mnist --output "$DATA" --num_shards 8
fi

timed() { # NAME CMD...: runs CMD, appends "NAME<TAB>seconds" to $OUT/wall_times.tsv
  local name=$1 start=$SECONDS
  shift
  echo "+ $*" >> "$OUT/commands.txt"
  "$@" > "$OUT/$name.log" 2>&1
  printf '%s\t%s\n' "$name" $((SECONDS - start)) >> "$OUT/wall_times.tsv"
}

pretrain() { # MODE
  [ -d "$OUT/$1/encoder" ] && return 0
  timed "pretrain-$1" python scripts/pretrain.py --config configs/pretrain/demo.yaml --preset convnextv2-demo \
    --config_overrides "conv_masking=$1,decoder_type=conv" --data_files "$DATA/*.tar" --output_dir "$OUT/$1" \
    --max_steps "$STEPS" --logging_steps 10 --save_steps "$STEPS" --visualize_steps "$STEPS" --report_to none
}

finetune() { # NAME SEED ARGS...
  local name=$1 seed=$2
  shift 2
  [ -f "$OUT/eval/$name-seed$seed.json" ] && return 0
  timed "finetune-$name-seed$seed" python scripts/evaluate.py "$@" --protocols finetune --dataset_name fashion-mnist \
    --train_samples 1000 --seed "$seed" --update_model_card false --output "$OUT/eval/$name-seed$seed.json"
}

pretrain sparse & pretrain token & wait %1 && wait %2
for seed in $SEEDS; do
  finetune sparse "$seed" --model "$OUT/sparse/encoder" & finetune token "$seed" --model "$OUT/token/encoder" &
  finetune random "$seed" --model "$OUT/sparse/encoder" --random_init & wait %1 && wait %2 && wait %3
done
python scripts/convnet_evidence_report.py --runs "$OUT" --output_dir benchmarks --seeds $SEEDS
