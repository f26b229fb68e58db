"""Publish a SimMIM pretraining run on the Hugging Face Hub (encoder + image processor + model card, one commit).

    python scripts/push_to_hub.py runs/swin-b --repo_id my-org/swin-b-simmim-in1k [--private] [--revision main] \
        [--include_full_checkpoint] [--eval_results runs/swin-b/eval.json] [--license apache-2.0] [--commit_message ...]
    python scripts/push_to_hub.py push.yaml        # the same arguments from a YAML or JSON file

The token comes from HF_TOKEN or `hf auth login`; there is deliberately no --token flag (command lines end up in
shell histories and process lists).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from simmim_hf.cli import parse_arguments, run_script


@dataclass
class PushArguments:
    run_dir: str = field(metadata={"help": "output_dir of scripts/pretrain.py (may also be given first, unnamed)"})
    repo_id: str = field(metadata={"help": "namespace/name of the model repository; created when missing"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (created from main if needed)"})
    include_full_checkpoint: bool = field(
        default=False, metadata={"help": "also upload the full SimMIM model under simmim/ (to resume pretraining)"}
    )
    eval_results: str | None = field(
        default=None, metadata={"help": "evaluation JSON of scripts/evaluate.py, shown in the card's model-index"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "license id for the model card"})
    commit_message: str | None = field(default=None, metadata={"help": "default describes the run"})


def parse_args(argv: list[str]) -> PushArguments:
    parser = HfArgumentParser(PushArguments)
    config_file = len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")) and Path(argv[0]).is_file()
    if argv and not argv[0].startswith("-") and not config_file:
        argv = ["--run_dir", *argv]  # the run folder may be given positionally, as in the README
    return parse_arguments(parser, argv)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("simmim_hf").setLevel(logging.INFO)
    # Imported after parsing so that --help stays fast.
    from huggingface_hub.errors import HfHubHTTPError

    from simmim_hf.publish.hub import HubPublishError, push_run_to_hub

    try:
        url = push_run_to_hub(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            include_full_checkpoint=args.include_full_checkpoint,
            eval_results=args.eval_results,
            commit_message=args.commit_message,
            license=args.license,
        )
    except (HubPublishError, HfHubHTTPError) as error:
        # An expected failure (bad folder, token, permissions, server refusal): the message, not a traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.run_dir} to {url}")
    return 0


if __name__ == "__main__":
    run_script(lambda: sys.exit(main()))
