"""Checkpoints that verify themselves: a manifest of every file (size, SHA-256), written last and fsynced.

`seal_checkpoint` runs on the main process once every process has written its files into the staging folder: it
hashes every file, fsyncs each one, writes the manifest (`RunDir.MANIFEST_NAME`) last, and fsyncs it and the folders,
so that the rename that publishes the checkpoint comes after everything it names is on disk. `verify_checkpoint`
re-hashes a checkpoint against its manifest and reads its safetensors weights for NaN/Inf; `pretrain.checkpoints`
uses it to choose the checkpoint to resume from.

Policy for checkpoints with no manifest (written before checkpoints carried one): `verify_checkpoint` reports them as
`LEGACY`; they are accepted, with a warning, when they are otherwise complete and their weights are readable and
finite (their other files cannot be checked).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from simmim_hf.publish.run_dir import RunDir

MANIFEST_FORMAT = 1
LEGACY = "no manifest (written before checkpoints carried one)"
# hashlib releases the GIL on large buffers: files are hashed in parallel, a few at a time.
_HASH_THREADS = max(1, min(8, os.cpu_count() or 1))


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, hex. Maps the file (no copy through a read buffer); an empty file hashes b""."""
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under `folder` (POSIX paths relative to it, sorted), the manifest itself excepted."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != RunDir.MANIFEST_NAME
    )


def _hash_all(folder: Path, names: Iterable[str], fsync: bool = False) -> dict[str, str]:
    """SHA-256 of each named file of `folder` (fsynced first with `fsync`), several files at a time."""

    def digest(name: str) -> str:
        if fsync:
            fsync_path(folder / name)
        return file_sha256(folder / name)

    names = list(names)
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        return dict(zip(names, pool.map(digest, names)))


def fsync_path(path: Path) -> None:
    """Flushes a file or a folder (its entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def seal_checkpoint(folder: Path) -> dict:
    """Writes `folder`'s manifest, last: size and SHA-256 of every file, each file fsynced first, then the manifest,
    every folder inside and `folder`'s parent fsynced. Main process only, once every process has written its files.
    Returns the manifest."""
    names = checkpoint_files(folder)
    digests = _hash_all(folder, names, fsync=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {name: {"size": (folder / name).stat().st_size, "sha256": digests[name]} for name in names},
    }
    path = RunDir.manifest_file(folder)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    for subfolder in sorted({(folder / name).parent for name in names} | {folder}, reverse=True):
        fsync_path(subfolder)
    fsync_path(folder.parent)
    return manifest


def manifest_problem(folder: Path) -> str | None:
    """Why `folder` does not match its manifest (a file missing, cut, changed or not listed), `LEGACY` when it has
    none, or None when every file matches. Files whose names start with "." (editor or OS leftovers) are ignored."""
    path = RunDir.manifest_file(folder)
    if not path.is_file():
        return LEGACY
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        listed = {name: (int(entry["size"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable {RunDir.MANIFEST_NAME} ({type(error).__name__})"
    present = set(checkpoint_files(folder))
    missing = sorted(set(listed) - present)
    if missing:
        return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = sorted(name for name in present - set(listed) if not Path(name).name.startswith("."))
    if extra:
        return f"{extra[0]} is not in its manifest"
    for name, (size, _) in sorted(listed.items()):
        actual = (folder / name).stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, its manifest says {size}"
    digests = _hash_all(folder, sorted(listed))
    changed = [name for name, (_, digest) in sorted(listed.items()) if digests[name] != digest]
    if changed:
        return f"{changed[0]} does not match its SHA-256 (corrupt)"
    return None


def weights_problem(folder: Path) -> str | None:
    """Why the safetensors weights of `folder` cannot be trusted (unreadable header or data, a NaN/Inf value), or
    None. Reads the tensors through a memory map, one at a time; folders without safetensors weights pass."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            shards = ["model.safetensors"]
        else:
            return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {index.name} ({type(error).__name__})"
    for shard in shards:
        try:
            with safe_open(str(folder / shard), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    tensor = weights.get_tensor(key)
                    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                        return f"{shard}: {key} holds NaN/Inf"
        except Exception as error:  # safetensors raises its own error type (and OSError) on a cut or garbled file
            return f"unreadable {shard} ({' '.join(str(error).split())[:120]})"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why checkpoint `folder` is corrupt (see `manifest_problem`, `weights_problem`), `LEGACY` for one with no
    manifest whose weights are fine, or None when it verifies."""
    folder = Path(folder)
    problem = manifest_problem(folder)
    if problem is not None and problem != LEGACY:
        return problem
    return weights_problem(folder) or problem
