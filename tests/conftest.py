"""Shared test setup: everything runs offline, tiny and on the CPU."""

import os

# Set before any Hugging Face library is imported: their constants are read at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """Folder with the four Fashion-MNIST IDX files (fetched once from Debian's package)."""
    from simmim_hf.data.fashion_mnist import ensure_fashion_mnist

    return ensure_fashion_mnist()


@pytest.fixture(scope="session")
def shards(tmp_path_factory, fashion_mnist_dir):
    """256 Fashion-MNIST images in 4 webdataset tar shards, written by scripts/prepare_data.py."""
    from pretrain_helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("shards"))
