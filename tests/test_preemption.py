"""Preemption end to end: SIGTERM, SIGINT (and the same path for SIGUSR1) at a seeded step stop every rank after that
step with its checkpoint and the documented exit status, and the rerun continues the uninterrupted run bitwise.

Runs are subprocesses of tests/pretrain_probe.py (a tiny ViT on 256 Fashion-MNIST images); the probe sends the
signal itself during the chosen step (SIMMIM_PROBE_SIGNAL_AT_STEP), to its own process or to its launcher, so the step
is known. To keep the file fast, each setting is one chain on one output folder, compared at its end with one
uninterrupted run: 1 process (SIGTERM plus a second SIGTERM during the save, then SIGINT, then the finish) and 2
processes (SIGTERM to `accelerate launch`, then two machines on loopback with SIGTERM to rank 1 only, then SIGINT to
the launcher, then the finish).
"""

import json
import random
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from pretrain_helpers import (
    LAUNCH_TWO,
    PROBE,
    PROBE_SCRIPT,
    ROOT,
    in_background,
    launch,
    loss_curve,
    pretrain_args,
    run,
)

from simmim_hf.pretrain.checkpoints import incompleteness

MAX_STEPS = 7
# Seeded: the same steps on every run of the suite; three stops, each after the previous one.
STOPS = sorted(random.Random(22).sample(range(2, MAX_STEPS), 3))
CPU = {"ACCELERATE_USE_CPU": "true"}


def command(launcher: list[str], base: Path, name: str, shards: list[str]) -> list[str]:
    """The probe (probe folder `base/name`) training `base/run`, under `launcher`."""
    return [*launcher, str(base / name), *pretrain_args(shards, base / "run", MAX_STEPS)]


def stopped_lines(stderr: str) -> list[str]:
    return [line[line.index("stopped: ") :] for line in stderr.splitlines() if "stopped: " in line]


def exit_codes(probe: Path, ranks: int) -> list[int]:
    return [int((probe / f"exit-rank{rank}.txt").read_text()) for rank in range(ranks)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_two_machines(argv_tail: list[str], env: dict) -> list[subprocess.CompletedProcess]:
    """`accelerate launch --num_machines 2 --machine_rank 0|1` on loopback, one process each, both at once."""
    import os
    import sys

    port = str(free_port())
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **CPU, **env}
    processes = []
    for machine in (0, 1):
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                    "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1", "--main_process_port", port,
                    "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
        processes.append(
            subprocess.Popen(
                [*launcher, *argv_tail],
                cwd=ROOT,
                env=environment,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    results = []
    for process, argv in zip(processes, ([*argv_tail],) * 2, strict=True):
        stdout, stderr = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(argv, process.returncode, stdout, stderr))
    return results


def assert_stopped(result_stderr: str, output: Path, step: int, signal_name: str, code: int) -> None:
    """One `stopped:` line naming the signal, the step and the checkpoint, and that checkpoint complete at `step`."""
    checkpoint = output / f"checkpoint-{step}"
    assert incompleteness(checkpoint) is None, incompleteness(checkpoint)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    lines = stopped_lines(result_stderr)
    assert lines == [
        f"stopped: {signal_name} after step {step} of {MAX_STEPS}; checkpoint written: {checkpoint}; rerun the same "
        f"command to resume (exit status {code})"
    ], result_stderr[-3000:]
    assert f"{signal_name} received: stopping after step {step}, writing checkpoint-{step} first" in result_stderr
    assert "KeyboardInterrupt" not in result_stderr


def assert_same_as(reference: Path, chain: Path, ranks: int) -> None:
    """Loss at every step and final weights (every rank) bitwise those of the uninterrupted run."""
    straight, resumed = loss_curve(reference / "run"), loss_curve(chain / "run")
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed == straight
    for rank in range(ranks):
        name = f"weights-rank{rank}.txt"
        assert (chain / "p-finish" / name).read_text() == (reference / "p-straight" / name).read_text()


@pytest.fixture(scope="module")
def one_process(shards, tmp_path_factory):
    """Uninterrupted; SIGTERM at STOPS[0] with a second SIGTERM during its save; SIGINT at STOPS[1]; the finish."""
    reference, base = tmp_path_factory.mktemp("one_straight"), tmp_path_factory.mktemp("one_chain")
    straight = in_background(run, command(PROBE, reference, "p-straight", shards))  # its own folder: alongside
    term = launch(
        command(PROBE, base, "p-term", shards),
        {"SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[0]}:SIGTERM", "SIMMIM_PROBE_SIGNAL_IN_SAVE": "SIGTERM"},
    )
    interrupt = launch(command(PROBE, base, "p-int", shards), {"SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[1]}:SIGINT"})
    finish = run(command(PROBE, base, "p-finish", shards))
    straight.result()
    return SimpleNamespace(reference=reference, base=base, term=term, interrupt=interrupt, finish=finish)


@pytest.fixture(scope="module")
def two_processes(shards, tmp_path_factory):
    """Uninterrupted; SIGTERM to `accelerate launch` at STOPS[0]; two machines, SIGTERM to rank 1 only at STOPS[1];
    SIGINT to the launcher at STOPS[2]; the finish."""
    reference, base = tmp_path_factory.mktemp("two_straight"), tmp_path_factory.mktemp("two_chain")
    one_machine = [*LAUNCH_TWO, PROBE_SCRIPT]
    straight = in_background(run, command(one_machine, reference, "p-straight", shards), CPU)  # alongside the chain
    term = launch(
        command(one_machine, base, "p-term", shards),
        {**CPU, "SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[0]}:SIGTERM:0:launcher"},
    )
    machines = launch_two_machines(
        command([PROBE_SCRIPT], base, "p-machines", shards),
        {"SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[1]}:SIGTERM:1"},
    )
    interrupt = launch(
        command(one_machine, base, "p-int", shards),
        {**CPU, "SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[2]}:SIGINT:1:launcher"},
    )
    finish = run(command(one_machine, base, "p-finish", shards), CPU)
    straight = straight.result()
    assert (reference / "p-straight" / "world-rank1.txt").read_text() == "2", straight.stderr[-2000:]
    return SimpleNamespace(
        reference=reference, base=base, term=term, machines=machines, interrupt=interrupt, finish=finish
    )


def test_sigterm_saves_the_step_and_exits_143_and_a_second_signal_waits(one_process):
    term = one_process.term
    assert term.returncode == 143 and exit_codes(one_process.base / "p-term", 1) == [143], term.stderr[-3000:]
    assert_stopped(term.stderr, one_process.base / "run", STOPS[0], "SIGTERM", 143)
    assert "SIGTERM received while the checkpoint was written: ignored" in term.stderr
    assert "Traceback" not in term.stderr


def test_ctrl_c_saves_the_step_and_ends_with_one_line(one_process):
    interrupt = one_process.interrupt
    assert interrupt.returncode == 130, interrupt.stderr[-3000:]
    assert f"Resuming from {one_process.base / 'run' / f'checkpoint-{STOPS[0]}'}" in interrupt.stderr
    assert_stopped(interrupt.stderr, one_process.base / "run", STOPS[1], "SIGINT", 130)
    assert "Traceback" not in interrupt.stderr
    assert stopped_lines(interrupt.stderr.strip().splitlines()[-1]), "the last line is the stopped: line"


def test_one_process_rerun_continues_the_uninterrupted_run_bitwise(one_process):
    assert f"Resuming from {one_process.base / 'run' / f'checkpoint-{STOPS[1]}'}" in one_process.finish.stderr
    assert_same_as(one_process.reference, one_process.base, 1)


def test_sigterm_to_the_launcher_stops_both_ranks_after_the_same_step(two_processes):
    term = two_processes.term
    # accelerate launch (torch elastic) forwards SIGTERM to every rank and exits 128 + 15 once they have.
    assert term.returncode == 143 and exit_codes(two_processes.base / "p-term", 2) == [143, 143], term.stderr[-3000:]
    assert_stopped(term.stderr, two_processes.base / "run", STOPS[0], "SIGTERM", 143)


def test_two_machines_resume_and_stop_together_on_a_signal_to_rank_1(two_processes):
    node0, node1 = two_processes.machines
    output = two_processes.base / "run"
    assert exit_codes(two_processes.base / "p-machines", 2) == [143, 143], node0.stderr[-3000:] + node1.stderr[-2000:]
    # A rank that stops on its own makes its launcher report a failed child (exit 1, its exit code in the summary).
    assert node0.returncode == node1.returncode == 1
    assert f"Resuming from {output / f'checkpoint-{STOPS[0]}'}" in node0.stderr
    assert_stopped(node0.stderr, output, STOPS[1], "SIGTERM", 143)
    assert len(stopped_lines(node1.stderr)) == 1  # one line per machine
    # One shared folder: the main process wrote the shared files once, each rank its own stream and RNG files.
    names = {p.name for p in (output / f"checkpoint-{STOPS[1]}").iterdir()}
    assert {"stream_state_rank0.json", "stream_state_rank1.json", "rng_state_0.pth", "rng_state_1.pth"} <= names
    assert names == {p.name for p in (output / f"checkpoint-{STOPS[0]}").iterdir()}
    assert not list(output.glob(".tmp-*"))


def test_sigint_to_the_launcher_stops_both_ranks(two_processes):
    interrupt = two_processes.interrupt
    assert interrupt.returncode == 130, interrupt.stderr[-3000:]
    assert exit_codes(two_processes.base / "p-int", 2) == [130, 130]
    assert f"Resuming from {two_processes.base / 'run' / f'checkpoint-{STOPS[1]}'}" in interrupt.stderr
    assert_stopped(interrupt.stderr, two_processes.base / "run", STOPS[2], "SIGINT", 130)


def test_two_processes_rerun_continues_the_uninterrupted_run_bitwise(two_processes):
    assert f"Resuming from {two_processes.base / 'run' / f'checkpoint-{STOPS[2]}'}" in two_processes.finish.stderr
    assert_same_as(two_processes.reference, two_processes.base, 2)


# -- in process: the handler, the restore, a signal after the last step, the exit codes --------------------------------
def fake_trainer(output_dir: Path, **args) -> SimpleNamespace:
    saved = []
    trainer = SimpleNamespace(
        args=SimpleNamespace(world_size=1, output_dir=str(output_dir), max_steps=5, device="cpu", **args),
        callback_handler=SimpleNamespace(callbacks=[]),
        is_world_process_zero=lambda: True,
        is_local_process_zero=lambda: True,
        model=None,
        saved=saved,
    )
    trainer._save_checkpoint = lambda model, trial: saved.append(trial)
    return trainer


def test_handlers_record_the_first_signal_and_are_restored_after(tmp_path):
    import os
    import signal

    from simmim_hf.pretrain.preemption import PreemptionGuard

    before = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: before.append(signum))
    try:
        guard = PreemptionGuard(fake_trainer(tmp_path))
        with guard.installed():
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # not the default action: recorded, the first one counts
            assert guard.received == signal.SIGUSR1 and guard.agree() == signal.SIGUSR1
        assert before == [] and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert before == [signal.SIGUSR1]  # the handler of before is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("signum, code, expected", [("SIGUSR1", 143, 143), ("SIGTERM", 99, 99), ("SIGINT", 99, 130)])
def test_a_signal_after_the_last_step_stops_at_the_final_checkpoint(tmp_path, signum, code, expected):
    import signal

    from simmim_hf.errors import Preempted
    from simmim_hf.pretrain.preemption import PreemptionGuard

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"")
    trainer = fake_trainer(tmp_path, preemption_exit_code=code)
    guard = PreemptionGuard(trainer)
    guard.received = getattr(signal, signum)
    with pytest.raises(Preempted) as stop:
        guard.on_train_end(trainer.args, SimpleNamespace(global_step=5), SimpleNamespace())
    assert stop.value.exit_code == expected and trainer.saved == []  # already saved: not twice
    assert str(stop.value) == (
        f"{signum} after step 5 of 5; checkpoint written: {checkpoint}; rerun the same command to resume "
        f"(exit status {expected})"
    )


def test_preemption_exit_code_is_checked(tmp_path):
    from simmim_hf.errors import UsageError
    from simmim_hf.pretrain.arguments import SimMIMTrainingArguments

    with pytest.raises(UsageError, match="preemption_exit_code must be in 1-255, got 0"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), preemption_exit_code=0)
