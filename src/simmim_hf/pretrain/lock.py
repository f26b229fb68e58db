"""One job per run folder: a lock file in `output_dir`, taken at job start, released at exit.

The lock (`RunDir.LOCK_NAME`) is a JSON object: host, PID, the process's start time (`/proc`, to tell a reused PID
from the holder) and the job's start time. It is created with `O_CREAT | O_EXCL`, so of two jobs started together
exactly one gets it. Only the global main process takes it (several machines sharing one `output_dir` hold one lock);
the outcome is broadcast, so every rank of a second job stops with the same line. A lock left by a dead process on
this host is taken over with a warning; one from another host is never broken automatically (this host cannot tell
whether that job still runs): the message says which file to delete once it does not.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from simmim_hf.errors import UsageError
from simmim_hf.publish.run_dir import RunDir

logger = logging.getLogger(__name__)

T = TypeVar("T")
# A lock file that holds no readable JSON this long after it was created belongs to a job that died creating it.
UNREADABLE_LOCK_GRACE_SECONDS = 30.0


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, from /proc), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; the command name may hold spaces


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether process `pid` runs on this host (and, given `start_ticks`, is the same process, not a reused PID)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if start_ticks is not None:
        ticks = process_start_ticks(pid)
        return ticks is None or ticks == start_ticks
    return True


def describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a job starting right now"
    return f"host {holder.get('host')}, PID {holder.get('pid')}, started {holder.get('started')}"


class RunLock:
    """The lock of one run folder, held by this process (see the module docstring). `release` is idempotent."""

    def __init__(self, path: Path, created_folder: bool) -> None:
        self.path = path
        self.created_folder = created_folder
        self.holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start_ticks": process_start_ticks(os.getpid()),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.held = False

    @classmethod
    def acquire(cls, output_dir: str | os.PathLike) -> RunLock:
        """Takes the lock of `output_dir` (created when missing); `UsageError` naming the holder when another job
        holds it."""
        folder = Path(output_dir)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--output_dir {folder}: it is a file, not a folder")
        created = not folder.exists()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--output_dir {folder}: cannot create it ({error.strerror or error})") from None
        lock = cls(RunDir(folder).lock, created)
        for attempt in range(20):  # a stale lock taken over, or a race with another job starting now: a few tries
            if lock._create():
                return lock
            holder = lock._read_holder()
            if holder == {}:
                continue  # released meanwhile
            if holder is None and not lock._unreadable_for_long():
                if attempt >= 10:
                    lock._refuse({})  # a job is creating it right now
            elif holder is not None and not lock._stale(holder):
                lock._refuse(holder)
            else:
                lock._take_over(holder)
            time.sleep(0.05)
        lock._refuse(lock._read_holder() or {})
        raise AssertionError("unreachable")  # _refuse raises

    def _create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(self.holder, handle)
            handle.flush()
            os.fsync(handle.fileno())
        self.held = True
        return True

    def _read_holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}  # released meanwhile: try again
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _unreadable_for_long(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > UNREADABLE_LOCK_GRACE_SECONDS
        except FileNotFoundError:
            return True

    def _stale(self, holder: dict[str, Any]) -> bool:
        """Held by a process of this host that is gone."""
        if holder.get("host") != self.holder["host"]:
            return False
        try:
            return not pid_alive(int(holder["pid"]), holder.get("pid_start_ticks"))
        except (KeyError, TypeError, ValueError):
            return False

    def _take_over(self, holder: dict[str, Any] | None) -> None:
        """Removes the stale lock of `holder` (None: unreadable) under a second, short-lived lock, so that of two jobs
        taking it over at once the second finds the first's fresh lock instead of deleting it."""
        guard = self.path.with_name(f"{self.path.name}.takeover")
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - guard.stat().st_mtime > UNREADABLE_LOCK_GRACE_SECONDS:
                    guard.unlink()  # left by a job that died taking a lock over
            return
        try:
            if self._read_holder() != holder:
                return  # released or taken meanwhile: look again
            if holder:
                logger.warning(
                    "Taking over the lock %s of a job that no longer runs (%s): it ended without releasing it",
                    self.path,
                    describe(holder),
                )
            else:
                logger.warning("Taking over the unreadable lock %s (a job died while creating it)", self.path)
            self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def _refuse(self, holder: dict[str, Any]) -> None:
        folder = self.path.parent
        if holder.get("host") not in (None, self.holder["host"]):
            raise UsageError(
                f"--output_dir {folder} is locked by a job on another machine ({describe(holder)}), which cannot be "
                f"checked from here: choose another --output_dir, or once no job runs there any more, delete {self.path}"
            )
        raise UsageError(
            f"--output_dir {folder} is in use by another job ({describe(holder)}): wait for it to end or choose "
            f"another --output_dir (lock file {self.path})"
        )

    def release(self) -> None:
        """Deletes the lock if it is still this process's, and the run folder if this job created it and left it
        empty."""
        if not self.held:
            return
        self.held = False
        if self._read_holder() == self.holder:
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when empty

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


def decided_by_main_process(args: Any, decide: Callable[[], T]) -> T:
    """`decide()` on the global main process only; its result (or its `UsageError`, raised on every rank) is
    broadcast to every rank. Touches `args.world_size`, which sets up the process group under a launcher."""
    if args.world_size <= 1 or not torch.distributed.is_initialized():
        return decide()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if args.process_index == 0:
        try:
            box[0] = ("ok", decide())
        except UsageError as error:
            box[0] = ("usage", str(error))
        except Exception as error:  # reach the broadcast, so the other ranks are not left waiting
            box[0], failure = ("fault", f"the main process failed: {type(error).__name__}: {error}"), error
    device = args.device if torch.distributed.get_backend() == "nccl" else None
    torch.distributed.broadcast_object_list(box, src=0, device=device)
    kind, value = box[0]
    if failure is not None:
        raise failure
    if kind == "usage":
        raise UsageError(value)
    if kind == "fault":
        raise RuntimeError(value)
    return value


def take_run_lock(args: Any) -> RunLock | None:
    """Before the job writes anything: the lock of `args.output_dir`, held by the global main process (None on the
    other ranks). A second job stops here on every rank, with one line naming the holder (`UsageError`)."""
    taken: list[RunLock] = []
    decided_by_main_process(args, lambda: taken.append(RunLock.acquire(args.output_dir)))
    return taken[0] if taken else None
