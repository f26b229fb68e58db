#!/usr/bin/env python
"""SimMIM pretraining with the HF Trainer.

    python scripts/pretrain.py --preset demo --output_dir runs/demo --max_steps 300      # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/pretrain.py --config runs/swin-b.yaml \
        [--any_flag value ...]

Every `TrainingArguments` flag works. `--config FILE` (YAML or JSON) supplies defaults; flags given on the command
line override it.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from simmim_hf.cli import expand_config_file
from simmim_hf.console import configure_logging
from simmim_hf.data import DataArguments
from simmim_hf.pretraining import run_pretraining
from simmim_hf.training import ModelArguments, SimMIMTrainingArguments


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))
    argv = expand_config_file(sys.argv[1:] if argv is None else argv)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    configure_logging(training_args.should_log)  # transformers at warnings; the run header says what runs
    return run_pretraining(model_args, data_args, training_args)


if __name__ == "__main__":
    main()
