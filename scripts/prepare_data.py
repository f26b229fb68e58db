#!/usr/bin/env python
"""Shards an image corpus for streaming pretraining: N WebDataset tar files or N parquet files.

    python scripts/prepare_data.py --source fashion-mnist --output data/fmnist --num_shards 8
    python scripts/prepare_data.py --source /photos --output data/photos --num_shards 64 --format parquet
    python scripts/prepare_data.py config.yaml        # the same arguments from a YAML or JSON file

Then pretrain with `--dataset_name webdataset --data_files 'data/fmnist/train-*.tar'` (or `parquet`, `*.parquet`).
"""

from simmim_hf.cli import run_script
from simmim_hf.data.write_shards import main

if __name__ == "__main__":
    run_script(main)
