"""Checkpoints that verify themselves: a manifest of every file (size, SHA-256), written last and fsynced.

`seal_checkpoint` runs on the main process once every process has written its files into the staging folder: it
fsyncs every file, hashes it (SHA-256 of each 32 MiB block, all blocks in parallel: a small file's one digest is its
`sha256sum`), writes the manifest (`RunDir.MANIFEST_NAME`) last, and fsyncs it and the folders, so that the rename
that publishes the checkpoint comes after everything it names is on disk. `verify_checkpoint`
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

import numpy as np

from simmim_hf.publish.run_dir import RunDir

MANIFEST_FORMAT = 1
LEGACY = "no manifest (written before checkpoints carried one)"
# Each file is hashed in blocks of this size, every block of every file on its own thread (hashlib releases the GIL),
# so that a checkpoint of 1 GB is hashed by all cores at once. A file no larger than one block has one digest, its
# plain SHA-256 (what `sha256sum` prints).
BLOCK_BYTES = 32 << 20


def _threads() -> int:
    try:
        return max(1, min(32, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(32, os.cpu_count() or 1))


def block_sha256(path: str | os.PathLike, index: int, block_bytes: int = BLOCK_BYTES) -> str:
    """SHA-256 (hex) of block `index` of a file, read through a memory map (no copy into a read buffer)."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            with view[index * block_bytes : (index + 1) * block_bytes] as block:
                return hashlib.sha256(block).hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under `folder` (POSIX paths relative to it, sorted), the manifest itself excepted."""
    return sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != RunDir.MANIFEST_NAME
    )


def file_digests(folder: Path, names: Iterable[str], fsync: bool = False) -> dict[str, list[str]]:
    """The SHA-256 of every `BLOCK_BYTES` block of each named file of `folder` (one digest for a small or empty
    file), every block on a thread of its own; with `fsync`, each file is flushed to disk first."""
    names = list(names)
    with ThreadPoolExecutor(_threads()) as pool:
        if fsync:
            list(pool.map(lambda name: fsync_path(folder / name), names))
        sizes = {name: (folder / name).stat().st_size for name in names}
        blocks = [(name, index) for name in names for index in range(max(1, -(-sizes[name] // BLOCK_BYTES)))]
        digests = list(pool.map(lambda block: block_sha256(folder / block[0], block[1]), blocks))
    result: dict[str, list[str]] = {name: [] for name in names}
    for (name, _), digest in zip(blocks, digests):
        result[name].append(digest)
    return result


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
    digests = file_digests(folder, names, fsync=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "block_bytes": BLOCK_BYTES,
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
        if manifest.get("format") != MANIFEST_FORMAT or manifest.get("block_bytes") != BLOCK_BYTES:
            return (
                f"{RunDir.MANIFEST_NAME} of another format ({manifest.get('format')}, {manifest.get('block_bytes')})"
            )
        listed = {name: (int(entry["size"]), list(entry["sha256"])) for name, entry in manifest["files"].items()}
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
    digests = file_digests(folder, sorted(listed))
    changed = [name for name, (_, digest) in sorted(listed.items()) if digests[name] != digest]
    if changed:
        return f"{changed[0]} does not match its SHA-256 (corrupt)"
    return None


# Bit masks of the exponent of each floating dtype of safetensors: a value is NaN/Inf when all its exponent bits are set.
_EXPONENT_MASKS = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}


def nonfinite_tensor(path: Path) -> str | None:
    """The name of a floating tensor of safetensors file `path` holding NaN/Inf, or None. Reads the data through a
    memory map, each tensor as integers of its width (one vectorised test of the exponent bits, no copy of the file).
    The file must be valid (`safe_open` checks the header and offsets first)."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        header_size = int.from_bytes(mapped[:8], "little")
        header = json.loads(mapped[8 : 8 + header_size])
        for key, entry in header.items():
            if key == "__metadata__" or entry["dtype"] not in _EXPONENT_MASKS:
                continue
            width, mask = _EXPONENT_MASKS[entry["dtype"]]
            begin, end = (8 + header_size + offset for offset in entry["data_offsets"])
            bits = np.frombuffer(mapped, dtype=width, count=(end - begin) // np.dtype(width).itemsize, offset=begin)
            bad = bool(np.any((bits & width(mask)) == width(mask)))
            del bits  # the map cannot close while a view of it is alive
            if bad:
                return key
    return None


def weights_problem(folder: Path) -> str | None:
    """Why the safetensors weights of `folder` cannot be trusted (unreadable header or data, a NaN/Inf value), or
    None. Folders without safetensors weights pass."""
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
            with safe_open(str(folder / shard), framework="pt"):  # validates the header and the data offsets
                pass
            bad = nonfinite_tensor(folder / shard)
        except Exception as error:  # safetensors raises its own error type (and OSError) on a cut or garbled file
            return f"unreadable {shard} ({' '.join(str(error).split())[:120]})"
        if bad is not None:
            return f"{shard}: {bad} holds NaN/Inf"
    return None


def verify_checkpoint(folder: str | os.PathLike) -> str | None:
    """Why checkpoint `folder` is corrupt (see `manifest_problem`, `weights_problem`), `LEGACY` for one with no
    manifest whose weights are fine, or None when it verifies."""
    folder = Path(folder)
    problem = manifest_problem(folder)
    if problem is not None and problem != LEGACY:
        return problem
    return weights_problem(folder) or problem
