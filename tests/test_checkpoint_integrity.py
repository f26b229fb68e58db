"""Checkpoints that verify themselves, one job per folder, a full disk during a checkpoint.

Two shared subprocess runs of tests/pretrain_probe.py (a tiny ViT, one checkpoint per step): `interrupted` stops on
a full disk (an injected ENOSPC) while checkpoint 9 is written, leaving checkpoints 1-8; `contested` is the
uninterrupted run of the same command while two more jobs try its folder. Every corruption case works on a copy of
`interrupted`. `interrupted` and the rerun of its damaged copy run alongside `contested` (separate folders).
"""

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from pretrain_helpers import (
    LAUNCH_TWO,
    PROBE,
    ROOT,
    cut,
    in_background,
    launch,
    loss_curve,
    nan_bytes,
    pretrain_args,
    safetensors_data_start,
    xor_64_bytes,
)

from simmim_hf.errors import UsageError
from simmim_hf.pretrain.checkpoints import check_resume_argument, find_resume_checkpoint
from simmim_hf.pretrain.lock import RunLock
from simmim_hf.pretrain.manifest import LEGACY, manifest_problem, seal_checkpoint, verify_checkpoint
from simmim_hf.publish.run_dir import RunDir

MAX_STEPS = 10
FULL_AT = 9  # the disk is full while checkpoint 9 is written: checkpoints 1..8 are complete


def command(shards, output: Path, probe: Path, *extra: str) -> list[str]:
    return [*PROBE, str(probe), *pretrain_args(shards, output, MAX_STEPS, "--save_steps", "1", *extra)]


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line]


def digests(probe: Path) -> dict[int, list[str]]:
    """Step -> [weights digest, optimizer-state digest], from SIMMIM_PROBE_DIGESTS."""
    lines = (probe / "digests-rank0.txt").read_text().splitlines()
    return {int(line.split()[0]): line.split()[1:] for line in lines}


@pytest.fixture(scope="module")
def interrupted_started(request, shards, tmp_path_factory):
    """The `interrupted` run, started on a thread of its own, then (when its test is selected) the `every_corruption`
    rerun of a damaged copy of it on another: `contested` asks for this first, so that these runs overlap it."""
    base = tmp_path_factory.mktemp("interrupted")
    env = {"SIMMIM_PROBE_DIGESTS": "1", "SIMMIM_PROBE_ENOSPC_IN_SAVE": str(FULL_AT)}
    started = in_background(launch, command(shards, base / "run", base / "probe"), env)
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    corrupted = None
    if "test_a_rerun_passes_over_every_corrupt_checkpoint_and_continues_the_run" in selected:
        corrupted = tmp_path_factory.mktemp("every_corruption")
        corrupted = (corrupted, in_background(rerun_every_corruption, started, base / "run", corrupted, shards))
    return base, started, corrupted


@pytest.fixture(scope="module")
def interrupted(interrupted_started):
    base, started, _ = interrupted_started
    return SimpleNamespace(run=base / "run", probe=base / "probe", result=started.result())


def in_process(argv: list[str]) -> tuple[int, str]:
    """scripts/pretrain.py's `main` under `cli.run_script`, in this process (no interpreter start-up): exit status,
    stderr."""
    from simmim_hf.cli import run_script
    from simmim_hf.pretrain.run import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        run_script(lambda: main(argv))
    return exit_info.value.code, stderr.getvalue()


def checkpoint_of(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step}"


@pytest.fixture(scope="module")
def contested(interrupted_started, shards, tmp_path_factory):
    """Jobs A and B (the same command) started together on one folder, then C while the winner trains (paused at
    step 3 until C has exited), then the winner finishes."""
    base = tmp_path_factory.mktemp("contested")
    output = base / "run"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "SIMMIM_PROBE_DIGESTS": "1",
           "SIMMIM_PROBE_PAUSE_AT_STEP": "3"}  # fmt: skip

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(command(shards, output, base / name, *extra), cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    jobs = {"a": start("a"), "b": start("b")}
    deadline = time.monotonic() + 300
    while not any((base / name / "paused-rank0").exists() for name in jobs) and time.monotonic() < deadline:
        time.sleep(0.1)
    winner = next(name for name in jobs if (base / name / "paused-rank0").exists())
    loser = "b" if winner == "a" else "a"
    lost = finished(jobs[loser], timeout=120)
    staggered = in_process(pretrain_args(shards, output, MAX_STEPS, "--save_steps", "1"))  # the winner is paused
    (base / winner / "go").touch()
    won = finished(jobs[winner], timeout=300)
    return SimpleNamespace(output=output, winner=base / winner, pid=jobs[winner].pid, won=won, lost=lost,
                           staggered=subprocess.CompletedProcess([], staggered[0], "", staggered[1]))  # fmt: skip


def finished(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# -- corrupt checkpoints -------------------------------------------------------------------------------------------
def cut_header(folder: Path) -> None:
    path = folder / "model.safetensors"
    start, _ = safetensors_data_start(path)
    path.write_bytes(path.read_bytes()[: start // 2])


CORRUPTIONS = {  # checkpoint step -> (what is done to it, what the log must say)
    8: (xor_64_bytes, "corrupt: model.safetensors does not match its SHA-256"),
    7: (cut("model.safetensors", 0), "corrupt: model.safetensors has 0 bytes"),
    6: (cut_header, "corrupt: model.safetensors has"),
    5: (cut("optimizer.pt"), "corrupt: optimizer.pt has"),
    4: (cut("rng_state.pth"), "corrupt: rng_state.pth has"),
    3: (cut(RunDir.STREAM_STATE_NAME.format(rank=0)), "corrupt: stream_state_rank0.json has"),
    2: (nan_bytes, "corrupt: model.safetensors does not match its SHA-256"),
}


def rerun_every_corruption(interrupted: Future, run: Path, base: Path, shards) -> subprocess.CompletedProcess:
    """Once `interrupted` has finished: a copy of its folder with checkpoints 2-8 each damaged one way and the lock of
    a dead process of this host left behind (a SIGKILLed job), rerun (the same command): its finished process."""
    interrupted.result()
    shutil.copytree(run, base / "run")
    for step, (corrupt, _) in CORRUPTIONS.items():
        corrupt(checkpoint_of(base / "run", step))
    RunDir(base / "run").lock.write_text(json.dumps(dead_holder()))
    return launch(command(shards, base / "run", base / "probe"), {"SIMMIM_PROBE_DIGESTS": "1"})


@pytest.fixture(scope="module")
def every_corruption(interrupted_started, interrupted):
    """The rerun of `rerun_every_corruption`: it must resume from checkpoint-1."""
    base, started = interrupted_started[2]
    return SimpleNamespace(run=base / "run", probe=base / "probe", result=started.result())


def test_a_rerun_passes_over_every_corrupt_checkpoint_and_continues_the_run(contested, every_corruption, interrupted):
    result = every_corruption.result
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    for step, (_, why) in CORRUPTIONS.items():
        line = f"Not resuming from {checkpoint_of(every_corruption.run, step)} ({why}"
        assert line in result.stderr, (line, result.stderr[-3000:])
    assert f"Resuming from {checkpoint_of(every_corruption.run, 1)}" in result.stderr
    # The lock of a dead process of this host, taken over with a warning.
    assert "Taking over the lock" in result.stderr and "no longer runs" in result.stderr
    # Steps 2-10 again, identical to the uninterrupted run: weights and optimizer state after every step, the loss
    # of every step, the final weights.
    reference = digests(contested.winner)
    resumed = digests(every_corruption.probe)
    assert sorted(resumed) == list(range(2, MAX_STEPS + 1))
    assert all(resumed[step] == reference[step] for step in resumed)
    assert digests(interrupted.probe) == {step: reference[step] for step in range(1, FULL_AT + 1)}
    losses = zip(loss_curve(every_corruption.run), loss_curve(contested.output), strict=True)
    assert all(a[0] == b[0] and abs(a[1] - b[1]) <= 1e-6 for a, b in losses)
    assert (every_corruption.probe / "weights-rank0.txt").read_text() == (
        contested.winner / "weights-rank0.txt"
    ).read_text()
    assert not RunDir(every_corruption.run).lock.exists()


@pytest.mark.parametrize("step", sorted(CORRUPTIONS))
def test_each_corruption_is_named_and_the_older_checkpoint_chosen(interrupted, tmp_path, step):
    folder = tmp_path / "run"
    for kept in (step - 1, step):
        shutil.copytree(checkpoint_of(interrupted.run, kept), checkpoint_of(folder, kept))
    corrupt, why = CORRUPTIONS[step]
    corrupt(checkpoint_of(folder, step))
    chosen, passed_over = find_resume_checkpoint(folder)
    assert chosen == str(checkpoint_of(folder, step - 1))
    assert len(passed_over) == 1 and passed_over[0].startswith(f"{checkpoint_of(folder, step)} ({why}")
    with pytest.raises(UsageError, match=rf"--resume_from_checkpoint .*checkpoint-{step}: cannot resume from it"):
        check_resume_argument(str(checkpoint_of(folder, step)))


def test_nan_weights_count_as_corrupt_even_without_a_manifest(interrupted, tmp_path, caplog):
    folder = tmp_path / "run"
    for step in (1, 2, 3):
        shutil.copytree(checkpoint_of(interrupted.run, step), checkpoint_of(folder, step))
        RunDir.manifest_file(checkpoint_of(folder, step)).unlink()  # as written before checkpoints had one
    nan_bytes(checkpoint_of(folder, 3))
    cut_header(checkpoint_of(folder, 2))
    chosen, passed_over = find_resume_checkpoint(folder)
    assert chosen == str(checkpoint_of(folder, 1))
    assert "corrupt: model.safetensors: " in passed_over[0] and "holds NaN/Inf" in passed_over[0]
    assert "corrupt: unreadable model.safetensors" in passed_over[1]
    # The policy for checkpoints from before manifests: accepted when complete and finite, with a warning.
    assert f"{checkpoint_of(folder, 1)} has {LEGACY}" in caplog.text


# -- the manifest ----------------------------------------------------------------------------------------------------
def test_manifest_lists_every_file_and_fails_on_any_change(interrupted, tmp_path):
    folder = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint_of(interrupted.run, 1), folder)
    manifest = json.loads(RunDir.manifest_file(folder).read_text())
    names = sorted(p.name for p in folder.iterdir() if p.name != RunDir.MANIFEST_NAME)
    assert sorted(manifest["files"]) == names and "optimizer.pt" in names
    assert manifest["files"]["optimizer.pt"]["size"] == (folder / "optimizer.pt").stat().st_size
    assert verify_checkpoint(folder) is None

    def changed(edit) -> str | None:
        trial = tmp_path / f"trial-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(folder, trial)
        edit(trial)
        return manifest_problem(trial)

    def flip_one_byte(trial: Path) -> None:
        data = bytearray((trial / "scheduler.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (trial / "scheduler.pt").write_bytes(bytes(data))

    assert changed(flip_one_byte) == "scheduler.pt does not match its SHA-256 (corrupt)"
    assert changed(lambda trial: (trial / "rng_state.pth").unlink()) == "rng_state.pth is missing"
    assert (
        changed(lambda trial: (trial / "rng_state_1.pth").write_bytes(b"x"))
        == "rng_state_1.pth is not in its manifest"
    )
    assert changed(lambda trial: (trial / ".DS_Store").write_bytes(b"x")) is None  # hidden leftovers are ignored
    assert changed(lambda trial: RunDir.manifest_file(trial).write_text("{")).startswith("unreadable")
    # Sealing again after a legitimate change (what the trainer does, last) makes it verify.
    trial = tmp_path / "resealed"
    shutil.copytree(folder, trial)
    (trial / "extra.json").write_text("{}")
    seal_checkpoint(trial)
    assert manifest_problem(trial) is None


# -- one job per folder ----------------------------------------------------------------------------------------------
def test_a_second_job_on_the_folder_stops_at_start_and_the_first_finishes(contested, interrupted):
    for second in (contested.lost, contested.staggered):
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert len(error_lines(second)) == 1, second.stderr[-3000:]
        line = error_lines(second)[0]
        assert f"--output_dir {contested.output} is in use by another job (host " in line
        assert f"PID {contested.pid}," in line
    won = contested.won
    assert won.returncode == 0, won.stderr[-3000:]
    summary = RunDir(contested.output).read_summary()
    assert summary["steps_completed"] == MAX_STEPS and summary["seed"] == 7
    # Untouched: every step equals the interrupted run's (the same command, alone in its folder), no lock left behind.
    assert {step: digests(contested.winner)[step] for step in range(1, FULL_AT + 1)} == digests(interrupted.probe)
    assert not RunDir(contested.output).lock.exists() and not list(contested.output.glob(".tmp-*"))


def test_every_rank_of_a_second_job_stops_with_the_holder_named(shards, tmp_path):
    folder = tmp_path / "run"
    with RunLock.acquire(folder) as lock:  # held by this (live) process
        args = pretrain_args(shards, folder, 2)
        result = launch([*LAUNCH_TWO, "scripts/pretrain.py", *args], {"ACCELERATE_USE_CPU": "true"})
        assert result.returncode != 0  # 2 on each rank; the launcher reports its children's failure as 1
        expected = (
            f"error: --output_dir {folder} is in use by another job (host {lock.holder['host']}, PID {os.getpid()},"
        )
        assert [line.startswith(expected) for line in error_lines(result)] == [True, True], result.stderr[-3000:]
        assert sorted(p.name for p in folder.iterdir()) == [RunDir.LOCK_NAME]
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


def dead_holder() -> dict:
    """What the lock of a process of this host that has ended holds."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return {"host": socket.gethostname(), "pid": dead.pid, "started": "2026-01-01T00:00:00+0000"}


def test_a_stale_lock_is_taken_over_and_a_foreign_one_is_not(tmp_path, caplog):
    folder = tmp_path / "run"
    folder.mkdir()
    lock_file = RunDir(folder).lock
    holder = dead_holder()
    lock_file.write_text(json.dumps(holder))
    with RunLock.acquire(folder):
        assert f"PID {holder['pid']}" in caplog.text and "no longer runs" in caplog.text
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"is in use by another job .*PID {os.getpid()}"):
            RunLock.acquire(folder)
    assert not lock_file.exists() and folder.is_dir()
    lock_file.write_text(json.dumps({**holder, "host": "elsewhere"}))
    with pytest.raises(UsageError, match=f"another machine .*elsewhere.* delete {lock_file}"):
        RunLock.acquire(folder)
    # A folder the lock created is removed again when the job leaves nothing in it.
    fresh = tmp_path / "fresh"
    RunLock.acquire(fresh).release()
    assert not fresh.exists()


# -- a wrong --resume_from_checkpoint, a full disk ---------------------------------------------------------------------
def test_a_wrong_resume_path_is_one_line_and_leaves_no_folder(shards, tmp_path):
    output = tmp_path / "run"
    status, stderr = in_process(pretrain_args(shards, output, 2, "--resume_from_checkpoint", "/nope/checkpoint-5"))
    assert status == 2
    assert stderr == "error: --resume_from_checkpoint /nope/checkpoint-5: no such checkpoint folder\n"
    assert not output.exists()


def assert_disk_full_stop(result: subprocess.CompletedProcess, output: Path, step: int, last: int) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert line.startswith(f"error: cannot write checkpoint-{step} in {output}: no space left on device."), line
    assert f"the last complete checkpoint, {checkpoint_of(output, last)}, is intact" in line
    assert not list(output.glob(".tmp-*")) and not checkpoint_of(output, step).exists()
    assert verify_checkpoint(checkpoint_of(output, last)) is None
    assert not RunDir(output).lock.exists() and not RunDir(output).summary.exists()


def test_no_space_left_during_a_checkpoint_is_one_line_and_keeps_the_last_one(interrupted):
    assert_disk_full_stop(interrupted.result, interrupted.run, FULL_AT, FULL_AT - 1)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 700 KB tmpfs: room for one tiny checkpoint (~400 KB), not two. Needs root and mount permission."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_real_full_disk_during_a_checkpoint(shards, small_tmpfs, tmp_path):
    output = small_tmpfs / "run"
    args = pretrain_args(shards, output, 6, "--save_steps", "2", "--visualize_steps", "0")
    result = launch([sys.executable, "scripts/pretrain.py", *args])
    assert_disk_full_stop(result, output, 4, 2)  # the real thing: torch's zip writer reports it without an errno
