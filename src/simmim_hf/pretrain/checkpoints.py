"""Checkpoints a killed run can trust: which folder to resume from, strict weight loading, the finished-run test.

A checkpoint is written under `.tmp-checkpoint-N/checkpoint-N`, sealed with its manifest (`pretrain.manifest`) and
renamed to `checkpoint-N` once every process has written its files (see `SimMIMTrainer._save_checkpoint`), so a
`checkpoint-N` folder is complete by construction; folders left by a kill, by older versions that wrote in place, or
damaged since (a changed, cut or missing file, NaN/Inf weights) are recognised and passed over, naming why.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from simmim_hf.errors import UsageError
from simmim_hf.pretrain.manifest import LEGACY, verify_checkpoint
from simmim_hf.publish.run_dir import RunDir

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tmp-"
TRAINER_STATE_FILE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def checkpoint_step(folder: str | Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def has_weights(folder: Path) -> bool:
    """Full weights, or the model part of an FSDP (sharded or full) or DeepSpeed checkpoint."""
    if any((folder / name).is_file() for name in _WEIGHT_FILES):
        return True
    return any(path.name.startswith(("pytorch_model_fsdp", "global_step")) for path in folder.iterdir())


def incompleteness(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from, or None when it is a complete checkpoint."""
    state = folder / TRAINER_STATE_FILE
    if not state.is_file():
        return f"no {TRAINER_STATE_FILE}"
    try:
        json.loads(state.read_text())
    except (OSError, ValueError):
        return f"unreadable {TRAINER_STATE_FILE}"
    if not has_weights(folder):
        return "no model weights"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` cannot be resumed from ("incomplete: ..." or "corrupt: ..."), or None. A checkpoint with no
    manifest (from before checkpoints carried one) passes when it is complete and its weights are readable and finite,
    with a warning: its other files cannot be checked."""
    reason = incompleteness(folder)
    if reason is not None:
        return f"incomplete: {reason}"
    problem = verify_checkpoint(folder)
    if problem == LEGACY:
        logger.warning("%s has %s: its weights are readable and finite, the rest is not checked", folder, LEGACY)
        return None
    return None if problem is None else f"corrupt: {problem}"


def find_resume_checkpoint(output_dir: str | Path) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-N` in `output_dir` that verifies (None when there is none) and a description of every
    newer folder passed over, with why (half-written staging folders included)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None, []
    candidates = sorted(
        (
            (checkpoint_step(path), path)
            for path in output_dir.iterdir()
            if path.is_dir() and checkpoint_step(path) is not None
        ),
        reverse=True,
    )
    staging = sorted(output_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"))
    passed_over = [f"{path} (a checkpoint write that never finished)" for path in staging]
    for _, path in candidates:
        reason = checkpoint_problem(path)
        if reason is None:
            return str(path), passed_over
        passed_over.append(f"{path} ({reason})")
    return None, passed_over


def check_resume_argument(checkpoint: str | None) -> None:
    """`--resume_from_checkpoint FOLDER` (not `latest`): `UsageError` naming it when it is not a folder or does not
    verify. Read-only, so the job can stop before writing anything."""
    if checkpoint in (None, "latest"):
        return
    folder = Path(checkpoint)
    if not folder.is_dir():
        raise UsageError(f"--resume_from_checkpoint {checkpoint}: no such checkpoint folder")
    reason = checkpoint_problem(folder)
    if reason is not None:
        raise UsageError(
            f"--resume_from_checkpoint {checkpoint}: cannot resume from it ({reason}); name another checkpoint, or "
            "leave the argument out to resume from the newest one that verifies"
        )


# Below this much free space, a write that failed without saying why (torch's zip writer) is put down to a full disk.
_NEARLY_FULL_BYTES = 4 << 20


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error`, raised while writing into `folder`, means no space (or quota) was left. torch's serializer
    reports a failed write without the errno, so the folder's free space decides then."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error) or "os error 28" in str(error):
        return True
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bfree * stats.f_frsize < _NEARLY_FULL_BYTES


def io_fault_cause(error: BaseException, folder: Path) -> str | None:
    """What a failed write into `folder` says to the user: "no space left on device" for a full disk, the OS's
    reason (and file) for another I/O error, None for an error that is no I/O fault (a bug, to be raised)."""
    if disk_full(error, folder):
        return "no space left on device"
    if isinstance(error, OSError):
        return f"{error.strerror or error}" + (f" ({error.filename})" if error.filename else "")
    return None


def checkpoint_write_fault(error: BaseException | None, run_dir: Path, step: int) -> str | None:
    """The one-line message for a checkpoint write that failed with `error` (None: on another process), once its
    staging folder is removed: the folder, the cause, the last complete checkpoint and what to do. None when
    `error` is no I/O fault (a bug, to be raised as it is)."""
    cause = "another process failed to write it (see its error)" if error is None else io_fault_cause(error, run_dir)
    if cause is None:
        return None
    complete = sorted(
        (path for path in run_dir.iterdir() if checkpoint_step(path) is not None and path.is_dir()),
        key=checkpoint_step,
    )
    complete = [path for path in complete if incompleteness(path) is None]
    if complete:
        size = sum(path.stat().st_size for path in complete[-1].rglob("*") if path.is_file())
        kept = f"the last complete checkpoint, {complete[-1]}, is intact (a checkpoint takes {size / 1e6:.1f} MB)"
    else:
        kept = "no earlier checkpoint exists"
    return (
        f"cannot write checkpoint-{step} in {run_dir}: {cause}. Its unfinished folder was removed and {kept}: "
        "free some space, then rerun the same command to resume"
    )


def rotate_checkpoints(output_dir: Path, limit: int | None, keep: str | None = None) -> None:
    """After a checkpoint is complete: deletes the incomplete `checkpoint-N` folders (left by older versions that
    wrote in place; nothing can resume from them) and, with a `limit`, the oldest complete ones beyond it (by step),
    never the newest nor `keep`."""
    folders = sorted((path for path in output_dir.iterdir() if checkpoint_step(path) is not None), key=checkpoint_step)
    complete = []
    for path in folders:
        if path.is_dir() and incompleteness(path) is None:
            complete.append(path)
        elif path.is_dir():
            logger.info("Deleting incomplete %s", path)
            shutil.rmtree(path, ignore_errors=True)
    if not limit or limit <= 0 or not complete:
        return
    protected = {complete[-1].resolve()} | ({Path(keep).resolve()} if keep else set())
    excess = len(complete) - max(limit, len(protected))
    for path in complete:
        if excess <= 0:
            break
        if path.resolve() not in protected:
            logger.info("Deleting %s (save_total_limit %d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)
            excess -= 1


def load_weights_strictly(model: torch.nn.Module, checkpoint: str | Path) -> int:
    """Loads the weights of `checkpoint` into `model` through transformers' own loading (which maps the on-disk
    key layout to the in-memory one), then copies them with a strict `load_state_dict`. Any missing, unexpected or
    mismatched tensor raises. Returns the number of tensors restored."""
    model_class: Any = type(model)
    dtype = next(model.parameters()).dtype
    loaded, info = model_class.from_pretrained(
        str(checkpoint), config=model.config, dtype=dtype, output_loading_info=True
    )
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {key: sorted(map(str, value)) for key, value in problems.items() if value}
    if problems:
        raise RuntimeError(f"{checkpoint}: the checkpoint does not match the model: {problems}")
    state_dict = loaded.state_dict()
    model.load_state_dict(state_dict, strict=True)
    return len(state_dict)


def finished_run(output_dir: str | Path, max_steps: int) -> dict[str, Any] | None:
    """The run summary when `output_dir` holds a finished run of `max_steps` steps: summary, final weights, `encoder/`,
    picture and card all written and readable (`RunDir.finish_missing`); else None. A run whose finish was cut short
    (killed, disk full) is not finished: its rerun resumes from the last checkpoint, trains nothing more and writes
    the finish again."""
    run = RunDir(output_dir)
    if not run.summary.is_file():
        return None
    try:
        summary = run.read_summary()
    except (OSError, ValueError):
        return None
    if summary.get("steps_completed") != max_steps:
        return None
    missing = run.finish_missing()
    if missing:
        logger.warning("%s: the finish of the run is incomplete (%s): writing it again", run.path, ", ".join(missing))
        return None
    return summary
