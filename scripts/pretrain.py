#!/usr/bin/env python
"""SimMIM pretraining with the HF Trainer.

    python scripts/pretrain.py --preset demo --output_dir runs/demo --max_steps 300      # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/pretrain.py --config runs/swin-b.yaml \
        [--any_flag value ...]

Every `TrainingArguments` flag works. `--config FILE` (YAML or JSON) supplies defaults; flags given on the command
line override it. A mistake in the arguments, the config file, the data paths or the launch prints one line,
`error: ...`, and exits with status 2 before anything is written.
"""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

from simmim_hf.cli import parse_arguments, run_script
from simmim_hf.data.stream import DataArguments
from simmim_hf.pretrain.console import configure_logging
from simmim_hf.pretrain.run import run_pretraining
from simmim_hf.pretrain.trainer import ModelArguments, SimMIMTrainingArguments


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))
    model_args, data_args, training_args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    configure_logging(training_args.should_log)  # transformers at warnings; the run header says what runs
    return run_pretraining(model_args, data_args, training_args)


if __name__ == "__main__":
    run_script(main)
