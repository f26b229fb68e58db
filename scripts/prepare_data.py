#!/usr/bin/env python
"""Shards an image corpus for streaming pretraining: N WebDataset tar files or N parquet files.

    python scripts/prepare_data.py --source fashion-mnist --output data/fmnist --num_shards 8
    python scripts/prepare_data.py --source /photos --output data/photos --num_shards 64 --format parquet
    python scripts/prepare_data.py config.yaml        # the same arguments from a YAML or JSON file

Then pretrain with `--dataset_name webdataset --data_files 'data/fmnist/train-*.tar'` (or `parquet`, `*.parquet`).
"""

import json
import sys

from transformers import HfArgumentParser

from simmim_hf.cli import parse_arguments, run_script
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data


def main() -> None:
    (args,) = parse_arguments(HfArgumentParser(PrepareDataArguments), sys.argv[1:])
    summary = prepare_data(args)
    print(
        f"Wrote {summary['num_written']} images into {len(summary['shards'])} {args.format} shards "
        f"({min(summary['shard_counts'])}-{max(summary['shard_counts'])} per shard) in {args.output}; "
        f"skipped {summary['num_skipped']} unreadable."
    )
    if summary["num_skipped"]:
        print("First skipped:", json.dumps(summary["skipped"][:5], indent=2))
    if "image_stats" in summary:
        stats = summary["image_stats"]
        print(
            f"Image statistics of the first {stats['num_images']} images ({stats['num_colour_images']} in colour): "
            f"mean {stats['mean']}, std {stats['std']} (pretrain with --image_stats dataset to use them)"
        )
    print(f"Read back with data_files={summary['data_files']!r}")


if __name__ == "__main__":
    run_script(main)
