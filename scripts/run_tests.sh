#!/usr/bin/env bash
# The test command: sets up ./.venv if needed, checks format and lint, then runs the whole suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
ruff format --check src scripts tests
ruff check src scripts tests
python -m pytest -q "$@"
