"""Publish a SimMIM pretraining run on the Hugging Face Hub (encoder + image processor + model card, one commit).

    python scripts/push_to_hub.py runs/swin-b --repo_id my-org/swin-b-simmim-in1k [--private] [--revision main] \
        [--include_full_checkpoint] [--eval_results runs/swin-b/eval.json] [--license apache-2.0] [--commit_message ...]
    python scripts/push_to_hub.py push.yaml        # the same arguments from a YAML or JSON file

The token comes from HF_TOKEN or `hf auth login`; there is deliberately no --token flag (command lines end up in
shell histories and process lists). All arguments: `simmim_hf.publish.hub.PushArguments`.
"""

from __future__ import annotations

import sys

from simmim_hf.cli import run_script
from simmim_hf.publish.hub import main

if __name__ == "__main__":
    run_script(lambda: sys.exit(main()))
