"""Downstream evaluation of an image encoder: kNN, linear probe and fine-tuning.

    python scripts/evaluate.py --model runs/demo/encoder --dataset_name fashion-mnist \
        --protocols knn,linear,finetune --train_samples 1000 --output runs/demo/eval.json
    python scripts/evaluate.py --model pixels --protocols knn,linear            # raw-pixel baseline
    python scripts/evaluate.py --model runs/demo/encoder --random_init         # random-weights baseline
    python scripts/evaluate.py eval_config.yaml                                # arguments from a file

All arguments: `python scripts/evaluate.py --help` (dataclass `simmim_hf.eval.arguments.EvaluationArguments`).
The work is `simmim_hf.eval.run.main`.
"""

from __future__ import annotations

import os
import sys

# This file is named like the `evaluate` library, and Python puts the script's folder first on sys.path, where
# `import evaluate` (done by the metric code) would find this script instead of the library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from simmim_hf.cli import run_script  # noqa: E402
from simmim_hf.eval.run import main  # noqa: E402

if __name__ == "__main__":
    run_script(main)
