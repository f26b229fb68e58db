#!/usr/bin/env bash
# The model-level tests (config, masking, model, converters, export, Auto*/remote code, golden loss) against the
# ends of the supported transformers range, each installed beside the venv's own (pip --target, no torch pulled).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
for version in ${SIMMIM_COMPAT_VERSIONS:-5.17.0 5.24.0}; do
  target=".cache/compat/transformers-$version"
  if [ ! -d "$target/transformers" ]; then
    python -m pip install -q --target "$target" "transformers==$version"
  fi
  echo "== transformers $version"
  PYTHONPATH="$PWD/$target" python -m pytest -q -p no:cacheprovider tests/test_config.py tests/test_masking.py \
    tests/test_modeling.py tests/test_convert.py tests/test_auto_and_remote.py tests/test_golden_loss.py
done
