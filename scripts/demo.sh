#!/usr/bin/env bash
# The main job on the embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist, no Hub, no root) ->
# 8 webdataset shards -> SimMIM pretraining of the `demo` ViT for a few minutes on the CPU (or GPU when present).
# Leaves in runs/demo/: the SimMIM checkpoint, encoder/ (stock ViTModel + image processor), reconstruction.png,
# simmim_run.json, the model card README.md, checkpoints and TensorBoard logs.
# Extra arguments go to pretrain.py, e.g. `bash scripts/demo.sh --max_steps 100`. Rerunning resumes from the
# last checkpoint in runs/demo (delete the folder to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ ! -f runs/demo-data/prepare_data.json ]; then
  python scripts/prepare_data.py --source fashion-mnist --output runs/demo-data --num_shards 8 --overwrite true
fi
python scripts/pretrain.py --config configs/pretrain/demo.yaml "$@"
echo
echo "Done. runs/demo/ holds the checkpoint, encoder/, reconstruction.png and README.md (model card)."
echo "Next: .venv/bin/python scripts/evaluate.py --model runs/demo/encoder --dataset_name fashion-mnist --protocols knn,linear"
