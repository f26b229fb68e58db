#!/usr/bin/env bash
# The model-level tests (config, masking, model, converters, export, Auto*/remote code, golden loss, the upstream
# contracts, the command line, whose --help and refusals read TrainingArguments' own fields) against the
# ends of the supported transformers range, each installed beside the venv's own (pip --target, no torch pulled).
# At the lower end also the Trainer-facing tests (resume, fault injection, pretraining), since they rely on Trainer
# internals that changed across 5.x.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
LOWEST=5.17.0
for version in ${SIMMIM_COMPAT_VERSIONS:-$LOWEST 5.24.0}; do
  target=".cache/compat/transformers-$version"
  if [ ! -d "$target/transformers" ]; then
    python -m pip install -q --target "$target" "transformers==$version"
  fi
  tests=(tests/test_config.py tests/test_masking.py tests/test_modeling.py tests/test_convert.py
         tests/test_auto_and_remote.py tests/test_golden_loss.py tests/test_presets_export.py tests/test_official.py
         tests/test_backbones.py tests/test_convnets.py tests/test_upstream_contracts.py tests/test_cli.py)
  if [ "$version" = "$LOWEST" ]; then
    tests+=(tests/test_faults.py tests/test_pretrain.py tests/test_stream_resume.py tests/test_from_encoder.py
           tests/test_preemption.py tests/test_checkpoint_integrity.py tests/test_run_settings.py)
  fi
  echo "== transformers $version"
  PYTHONPATH="$PWD/$target" python -m pytest -q -p no:cacheprovider "${tests[@]}"
done
