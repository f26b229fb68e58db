#!/usr/bin/env bash
# Reproduces README section 7 on a CPU: pretrains the demo ViT on Fashion-MNIST for 1,000 steps (the main job) and
# 5,000 steps, then scores both against the same architecture from random init and raw pixels with kNN, linear
# probe and 1,000-label fine-tuning on the full test set. About 45 minutes on 2 cores; finished runs are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/demo.sh                       # set-up, shards, and the 1,000-step main job in runs/demo
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python scripts/pretrain.py --config configs/pretrain/demo.yaml --output_dir runs/demo-5k --max_steps 5000 \
  --save_steps 1000 --visualize_steps 1000
mkdir -p runs/eval
common=(--dataset_name fashion-mnist --train_samples 1000 --seed 0)
python scripts/evaluate.py --model runs/demo/encoder --protocols knn,linear,finetune "${common[@]}" --output runs/eval/simmim-1k.json
python scripts/evaluate.py --model runs/demo-5k/encoder --protocols knn,linear,finetune "${common[@]}" --output runs/eval/simmim-5k.json
python scripts/evaluate.py --model runs/demo-5k/encoder --protocols knn,linear --feature_layer -3 "${common[@]}" --output runs/eval/simmim-5k-block2.json
python scripts/evaluate.py --model runs/demo/encoder --random_init --protocols knn,linear,finetune "${common[@]}" --output runs/eval/random.json
python scripts/evaluate.py --model pixels --protocols knn,linear "${common[@]}" --output runs/eval/pixels.json
python scripts/results_table.py "raw pixels=runs/eval/pixels.json" "demo ViT, random init=runs/eval/random.json" \
  "demo ViT, SimMIM 1k steps=runs/eval/simmim-1k.json" "demo ViT, SimMIM 5k steps=runs/eval/simmim-5k.json" \
  "demo ViT, SimMIM 5k steps, block 2 features=runs/eval/simmim-5k-block2.json"
