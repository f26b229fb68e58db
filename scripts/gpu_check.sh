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
