"""The embedded default corpus: Fashion-MNIST from Debian's `dataset-fashion-mnist` package, with no Hub access.

`ensure_fashion_mnist()` finds or fetches the four IDX files (no root needed: `apt-get download` + `dpkg-deb -x`);
`load_fashion_mnist(split)` reads them into numpy; `fashion_mnist_dataset(split)` wraps them as a `datasets.Dataset`
with an `image` (PIL, mode "L") and a `label` (ClassLabel) column.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Mean/std of the 60k training images, in [0, 1] units (checked against the data in tests/test_fashion_mnist.py).
MEAN = 0.2860
STD = 0.3530
DEBIAN_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def default_cache_dir() -> Path:
    root = os.environ.get("SIMMIM_HF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "simmim_hf")
    return Path(root) / "fashion-mnist"


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for pair in FILES.values() for name in pair)


def ensure_fashion_mnist(directory: str | os.PathLike | None = None) -> Path:
    """Returns a folder holding the four Fashion-MNIST IDX files, fetching Debian's package when needed.

    Looks in, in order: `directory`, `$SIMMIM_FASHION_MNIST_DIR`, the system install, the user cache.
    """
    candidates = [Path(p) for p in (directory, os.environ.get("SIMMIM_FASHION_MNIST_DIR")) if p]
    candidates += [SYSTEM_DIR, default_cache_dir()]
    for candidate in candidates:
        if _complete(candidate):
            return candidate
    target = Path(directory) if directory else default_cache_dir()
    _fetch_debian_package(target)
    return target


def _fetch_debian_package(target: Path) -> None:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError(
            "Fashion-MNIST is not on this machine and apt-get/dpkg-deb are missing; put the four IDX .gz files in "
            "a folder and set SIMMIM_FASHION_MNIST_DIR to it."
        )
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", DEBIAN_PACKAGE]
        result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0 and os.geteuid() == 0:
            # A fresh machine has no package lists yet; as root we may refresh them once.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"`apt-get download {DEBIAN_PACKAGE}` failed (run `apt-get update` once as root, then retry):\n"
                + result.stderr.strip()
            )
        debs = list(Path(tmp).glob(f"{DEBIAN_PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "root")], check=True)
        extracted = Path(tmp) / "root" / SYSTEM_DIR.relative_to("/")
        for pair in FILES.values():
            for name in pair:
                shutil.copyfile(extracted / name, target / name)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(
    split: str = "train", directory: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(images, labels)`: images `(N, 28, 28)` uint8, labels `(N,)` int64. `split` is "train" or "test"."""
    if split not in FILES:
        raise ValueError(f"split must be one of {sorted(FILES)}, got {split!r}")
    folder = ensure_fashion_mnist(directory)
    images_name, labels_name = FILES[split]
    return _read_idx(folder / images_name), _read_idx(folder / labels_name).astype(np.int64)


def to_dataset(images: np.ndarray, labels: np.ndarray) -> Any:
    """images: (N, 28, 28) uint8, labels: (N,) -> a `datasets.Dataset` with `image` (PIL "L") and `label`
    (ClassLabel) columns."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


def fashion_mnist_dataset(split: str = "train", directory: str | os.PathLike | None = None) -> Any:
    """Fashion-MNIST as a `datasets.Dataset` with `image` (PIL "L") and `label` (ClassLabel) columns."""
    return to_dataset(*load_fashion_mnist(split, directory))
