"""Downstream evaluation of an image encoder: kNN, linear probe and fine-tuning.

    python scripts/evaluate.py --model runs/demo/encoder --dataset_name fashion-mnist \
        --protocols knn,linear,finetune --train_samples 1000 --output runs/demo/eval.json
    python scripts/evaluate.py --model pixels --protocols knn,linear            # raw-pixel baseline
    python scripts/evaluate.py --model runs/demo/encoder --random_init         # random-weights baseline
    python scripts/evaluate.py eval_config.yaml                                # arguments from a file

All arguments: `python scripts/evaluate.py --help` (dataclass `simmim_hf.evaluation.EvaluationArguments`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

# This file is named like the `evaluate` library, and Python puts the script's folder first on sys.path, where
# `import evaluate` (done by the metric code) would find this script instead of the library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from transformers import HfArgumentParser  # noqa: E402

from simmim_hf.cli import parse_arguments, run_script  # noqa: E402
from simmim_hf.eval.run import EvaluationArguments, run_evaluation  # noqa: E402
from simmim_hf.publish.run_dir import RunDir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> EvaluationArguments:
    argv = sys.argv[1:] if argv is None else argv
    (args,) = parse_arguments(HfArgumentParser(EvaluationArguments), argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    payload = run_evaluation(args)
    run_dir = None if (args.random_init or args.raw_pixels) else RunDir.containing(args.model)
    if run_dir is not None and args.update_model_card:
        # The run's local model card gets the results in its evaluation table and model-index.
        from simmim_hf.publish.model_card import write_model_card

        print(f"updated the model card {write_model_card(run_dir.path, eval_results=payload)}")
    return payload


if __name__ == "__main__":
    run_script(main)
