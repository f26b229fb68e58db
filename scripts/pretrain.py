#!/usr/bin/env python
"""SimMIM pretraining with the HF Trainer.

    python scripts/pretrain.py --preset demo --output_dir runs/demo --max_steps 300      # one process
    accelerate launch --config_file configs/accelerate/ddp.yaml scripts/pretrain.py --config runs/swin-b.yaml \
        [--any_flag value ...]

Every `TrainingArguments` flag works, except the few docs/cli.md lists as refused (one line, exit 2). `--config FILE` (YAML or JSON) supplies defaults; flags given on the command
line override it. A mistake in the arguments, the config file, the data paths or the launch prints one line,
`error: ...`, and exits with status 2 before anything is written.
"""

from simmim_hf.cli import run_script
from simmim_hf.pretrain.run import main

if __name__ == "__main__":
    run_script(main)
