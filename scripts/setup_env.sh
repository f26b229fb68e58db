#!/usr/bin/env bash
# Creates ./.venv with everything the project, its main job and its tests need (idempotent, ~2 min when fresh).
# torch/torchvision are pinned here, not in setup.cfg: users bring their own build. The constraint file keeps
# every later install from pulling another torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
CONSTRAINTS="$(mktemp)"
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CONSTRAINTS"
if ! python -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -c "$CONSTRAINTS" torch==2.14.1 torchvision==0.29.1
fi
# The editable install is redone only when the packaging files changed, or when the environment's simmim_hf is not
# this checkout's (a stamp in .venv holds a hash of setup.cfg + pyproject.toml and this checkout's path).
STAMP=.venv/.simmim_hf-install-stamp
WANT="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1) $PWD"
HAVE="$(cat "$STAMP" 2>/dev/null || true)"
if [ "$WANT" != "$HAVE" ] || ! SRC="$PWD/src/" python -c \
    "import os, sys, simmim_hf; sys.exit(not simmim_hf.__file__.startswith(os.environ['SRC']))" 2>/dev/null; then
  python -m pip install -q -c "$CONSTRAINTS" -e ".[dev]"
  printf '%s\n' "$WANT" > "$STAMP"
else
  echo "simmim_hf: setup.cfg and pyproject.toml unchanged since the last install; skipping pip install -e"
fi
rm -f "$CONSTRAINTS"
python - <<'PY'
import torch, torchvision, transformers, datasets, accelerate
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, "
      f"datasets {datasets.__version__}, accelerate {accelerate.__version__}")
PY
