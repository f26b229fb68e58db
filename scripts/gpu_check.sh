#!/usr/bin/env bash
# The device check, prepared to run once on a lent GPU machine (device tool), from the repository root:
#   bash scripts/gpu_check.sh        # writes $OUT/*.json and $OUT/gpu_check.log (OUT defaults to ./benchmarks/gpu)
# Needs only torch + transformers (+ pytest for the model tests); datasets/evaluate are not used here.
# Record what it measured in benchmarks/README.md (card, versions, figures).
set -uo pipefail
OUT="${OUT:-benchmarks/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" HF_HUB_OFFLINE=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
if python -c "import pytest" 2>/dev/null; then
  timeout 240 python -m pytest -q -x -p no:cacheprovider tests/test_masking.py tests/test_config.py tests/test_modeling.py \
    tests/test_convert.py tests/test_auto_and_remote.py 2>&1 | tail -5
fi
for preset in vit-base-patch16-224 swin-base-window6-192; do
  timeout 150 python scripts/benchmark.py --preset "$preset" --batch_size 128 --precision bf16 --steps 20 --warmup 5 \
    --output "$OUT/bench_${preset}_bf16.json"
done
timeout 200 python scripts/benchmark.py --preset vit-base-patch16-224 --batch_size 128 --precision bf16 --steps 20 \
  --warmup 8 --compile --variants transformers,simmim_hf+fused --output "$OUT/bench_vit-base_bf16_compile.json"
# Input pipeline on the GPU host: per-core JPEG decode + augmentation (ours vs PIL + torchvision), then short
# end-to-end jobs (scripts/pretrain.py, bf16 autocast and fused AdamW by default on the GPU) for ViT-B/16@224 and
# Swin-B@192 on skimage photos written as 1600x1200 JPEG shards, 8 DataLoader workers; images/s from the Trainer.
timeout 90 python scripts/benchmark.py --decode --repeats 3 --output "$OUT/decode.json"
E2E=$(mktemp -d)
python - "$E2E" <<'PY'
import os, sys; sys.path.insert(0, "scripts"); from benchmark import photo_jpegs
folder = os.path.join(sys.argv[1], "photos"); os.makedirs(folder)
for i in range(512):
    photos = photo_jpegs(1600, 1200) if i == 0 else photos
    open(os.path.join(folder, f"{i:04d}.jpg"), "wb").write(photos[i % len(photos)])
PY
python scripts/prepare_data.py --source "$E2E/photos" --output "$E2E/shards" --num_shards 8 >/dev/null
for preset in vit-base-patch16-224 swin-base-window6-192; do
  timeout 150 python scripts/pretrain.py --preset "$preset" --dataset_name webdataset --data_files "$E2E"/shards/*.tar \
    --output_dir "$E2E/run-$preset" --max_steps 40 --per_device_train_batch_size 128 --dataloader_num_workers 8 \
    --shuffle_buffer_size 256 --logging_steps 10 --save_steps 1000 --report_to none --num_visualize_images 2 \
    2>&1 | grep -E "images_per_second|train_samples_per_second" | tail -3
done
# FSDP2 with the shipped config (SHARDED_STATE_DICT checkpoints): 4 steps, then resume to 6 from the sharded
# checkpoint; the final save must be a full model the job can export (encoder/, card). Noise images: a save check.
SCRATCH=$(mktemp -d)
mkdir "$SCRATCH/images"
python -c "
import numpy as np; from PIL import Image
rng = np.random.default_rng(0)
[Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(f'$SCRATCH/images/{i}.png') for i in range(128)]"
python scripts/prepare_data.py --source "$SCRATCH/images" --output "$SCRATCH/shards" --num_shards 2 >/dev/null
FSDP=(accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 scripts/pretrain.py
  --preset demo --dataset_name webdataset --data_files "$SCRATCH"/shards/*.tar --streaming true --shuffle_buffer_size 1
  --output_dir "$SCRATCH/run" --per_device_train_batch_size 16 --save_steps 2 --logging_steps 1 --report_to none
  --num_visualize_images 4)
timeout 150 "${FSDP[@]}" --max_steps 4 >"$OUT/fsdp_1.log" 2>&1 && timeout 150 "${FSDP[@]}" --max_steps 6 >"$OUT/fsdp_2.log" 2>&1
echo "fsdp exit $?"; ls "$SCRATCH/run" "$SCRATCH/run/checkpoint-6"; grep -h "Resuming from\|error" "$OUT"/fsdp_*.log | tail -3
python -c "import json; print('fsdp steps_completed', json.load(open('$SCRATCH/run/simmim_run.json'))['steps_completed'])"
