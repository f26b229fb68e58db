"""Fault injection, trainer side: SIGKILL at a seeded random step (1 and 2 ranks, DataLoader workers) then the same
command again, a kill during a checkpoint write, forced NaN steps, a rerun of a finished run, launch mistakes.

Runs are subprocesses of tests/pretrain_probe.py (a tiny ViT on 256 Fashion-MNIST images), so a kill is a real
SIGKILL and the outcome is what a user sees: files, exit status, stderr, weights.
"""

import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
from pretrain_helpers import (
    LAUNCH_TWO,
    PROBE,
    PROBE_SCRIPT,
    ROOT,
    folder_digest,
    launch,
    loss_curve,
    pretrain_args,
    run,
    together,
    write_png_tar,
)
from safetensors.torch import load_file

from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling

MAX_STEPS = 8
KILL_STEP = random.Random(8).randint(3, MAX_STEPS - 1)  # seeded: the same step on every run of the suite


def kill_and_rerun(
    shards, base: Path, launcher: list[str], env: dict | None = None, extra: tuple = (), kill_step: int = KILL_STEP
) -> SimpleNamespace:
    """An uninterrupted run, a run SIGKILLed at the end of `kill_step`, and the same command again."""

    def command(name: str, output: str) -> list[str]:
        args = pretrain_args(
            shards, base / output, MAX_STEPS, "--save_steps", "2", "--dataloader_num_workers", "1", *extra
        )
        return [*launcher, str(base / name), *args]

    # The uninterrupted run and the run to kill are independent (two folders): both at once.
    _, killed = together(
        (run, command("p-straight", "straight"), env),
        (launch, command("p-killed", "run"), {**(env or {}), "SIMMIM_PROBE_KILL_AT_STEP": str(kill_step)}),
    )
    assert killed.returncode != 0 and not (base / "run" / "simmim_run.json").exists()
    resumed = run(command("p-resumed", "run"), env)
    return SimpleNamespace(
        base=base, resumed=resumed, checkpoint=base / "run" / f"checkpoint-{2 * ((kill_step - 1) // 2)}"
    )


def nonfinite_streak_run(shards, base: Path) -> subprocess.CompletedProcess:
    args = pretrain_args(shards, base / "run", 10, "--save_steps", "2", "--max_nonfinite_steps", "3")
    return launch(
        [*PROBE, str(base / "probe"), *args], {"SIMMIM_PROBE_NAN_AT": "3,5,6,7", "SIMMIM_PROBE_DIGESTS": "1"}
    )


def single_nonfinite_run(shards, base: Path) -> subprocess.CompletedProcess:
    return launch([*PROBE, str(base / "probe"), *pretrain_args(shards, base / "run", 3)], {"SIMMIM_PROBE_NAN_AT": "2"})


def world_size_one_run(shards, base: Path) -> subprocess.CompletedProcess:
    return launch([*LAUNCH_TWO, "scripts/pretrain.py", *pretrain_args(shards, base / "run", 2)])


@pytest.fixture(scope="module", autouse=True)
def single_runs(request, tmp_path_factory):
    """Test name -> (its folder, the future of its finished run), for the selected tests of SINGLE_RUNS (at the end
    of this file): their runs start with the module's first test, one at a time on a thread of their own, and so
    overlap the kill-and-rerun chains; each test waits for its own run, then checks its outcome."""
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    lane = ThreadPoolExecutor(max_workers=1)
    runs = {}
    for name, job in SINGLE_RUNS.items():
        if name in selected:
            base = tmp_path_factory.mktemp(name[5:30])
            runs[name] = (base, lane.submit(job, request.getfixturevalue("shards"), base))
    yield runs
    lane.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def one_rank(shards, tmp_path_factory):
    return kill_and_rerun(shards, tmp_path_factory.mktemp("one_rank"), PROBE)


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory):
    faults = kill_and_rerun(
        shards, tmp_path_factory.mktemp("two_ranks"), [*LAUNCH_TWO, PROBE_SCRIPT], {"ACCELERATE_USE_CPU": "true"}
    )
    assert (faults.base / "p-resumed" / "world-rank1.txt").read_text() == "2"
    return faults


def assert_restored_bitwise(faults: SimpleNamespace, rank: int) -> None:
    """The weights and optimizer state the resumed run started from are the checkpoint's, tensor by tensor."""
    assert f"Resuming from {faults.checkpoint}" in faults.resumed.stderr
    restored = load_file(faults.base / "p-resumed" / f"resumed-model-rank{rank}.safetensors")
    expected = SimMIMForMaskedImageModeling.from_pretrained(faults.checkpoint).state_dict()
    assert restored.keys() == expected.keys() and len(restored) > 40
    unequal = [name for name in expected if not torch.equal(restored[name], expected[name])]
    assert not unequal, f"{len(unequal)} of {len(expected)} tensors differ from the checkpoint: {unequal[:3]}"
    saved = torch.load(faults.checkpoint / "optimizer.pt", weights_only=True)
    loaded = torch.load(faults.base / "p-resumed" / f"resumed-optimizer-rank{rank}.pt", weights_only=True)
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert [group["lr"] for group in loaded["param_groups"]] == [group["lr"] for group in saved["param_groups"]]


def assert_same_run(faults: SimpleNamespace) -> None:
    straight, resumed = loss_curve(faults.base / "straight"), loss_curve(faults.base / "run")
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))
    difference = max(abs(a - b) for (_, a), (_, b) in zip(straight, resumed, strict=True))
    assert difference <= 1e-6, (difference, straight, resumed)
    for rank in (0, 1) if (faults.base / "p-straight" / "weights-rank1.txt").exists() else (0,):
        name = f"weights-rank{rank}.txt"
        assert (faults.base / "p-straight" / name).read_text() == (faults.base / "p-resumed" / name).read_text()


def test_resume_restores_every_weight_and_optimizer_tensor(one_rank):
    assert_restored_bitwise(one_rank, 0)
    scheduler = torch.load(one_rank.checkpoint / "scheduler.pt", weights_only=True)
    assert scheduler["last_epoch"] == int(one_rank.checkpoint.name.split("-")[1])
    # No pickled arguments anywhere in the run; the JSON copy carries them instead.
    assert not list((one_rank.base / "run").rglob("training_args.bin"))
    assert json.loads((one_rank.checkpoint / "training_args.json").read_text())["max_steps"] == MAX_STEPS


def test_killed_run_continues_the_uninterrupted_one(one_rank):
    assert_same_run(one_rank)


def test_two_ranks_resume_restores_every_weight(two_ranks):
    for rank in (0, 1):
        assert_restored_bitwise(two_ranks, rank)
    assert not list((two_ranks.base / "run").glob(".tmp-*"))
    assert {"stream_state_rank0.json", "stream_state_rank1.json"} <= {p.name for p in two_ranks.checkpoint.iterdir()}


def test_two_ranks_killed_run_continues_the_uninterrupted_one(two_ranks):
    assert_same_run(two_ranks)


# The real augmentation (random resized crop and flip, uint8 pixels normalised on the device), not the probe's fixed
# resize: 64 images a batch make a pass over the 256 images 4 steps long, so the 8 steps read every image twice, two
# DataLoader workers each read two shards, and the kill at step 7 resumes from checkpoint-6, in the second pass.
REAL_AUGMENT_KILL_STEP = 7


@pytest.fixture(scope="module")
def real_augment(shards, tmp_path_factory):
    env = {"SIMMIM_PROBE_REAL_AUGMENT": "1", "SIMMIM_PROBE_DIGESTS": "1"}
    extra = ("--per_device_train_batch_size", "64", "--dataloader_num_workers", "2")
    base = tmp_path_factory.mktemp("real_augment")
    return kill_and_rerun(shards, base, PROBE, env, extra, kill_step=REAL_AUGMENT_KILL_STEP)


def probe_lines(faults: SimpleNamespace, probe: str, name: str) -> list[str]:
    return (faults.base / probe / name).read_text().splitlines()


def test_real_augmentation_varies_from_pass_to_pass(real_augment):
    """Each image is read twice: a fixed resize would give 256 distinct input tensors out of 512."""
    batches = [line.split() for line in probe_lines(real_augment, "p-straight", "samples-rank0.txt")]
    assert [len(batch) for batch in batches] == [64] * MAX_STEPS
    digests = [digest for batch in batches for digest in batch]
    assert len(set(digests)) >= 0.95 * len(digests), len(set(digests))


def test_killed_run_with_the_real_augmentation_continues_the_uninterrupted_one(real_augment):
    checkpoint_step = int(real_augment.checkpoint.name.split("-")[1])
    assert checkpoint_step == 6 and f"Resuming from {real_augment.checkpoint}" in real_augment.resumed.stderr
    for name in ("samples-rank0.txt", "digests-rank0.txt"):  # the augmented inputs; weights + optimizer per step
        straight = probe_lines(real_augment, "p-straight", name)
        killed, resumed = probe_lines(real_augment, "p-killed", name), probe_lines(real_augment, "p-resumed", name)
        assert len(straight) == MAX_STEPS and len(killed) == REAL_AUGMENT_KILL_STEP, name
        assert killed[:checkpoint_step] + resumed == straight, name
    straight, resumed = loss_curve(real_augment.base / "straight"), loss_curve(real_augment.base / "run")
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed == straight  # bitwise: the same floats
    assert probe_lines(real_augment, "p-straight", "weights-rank0.txt") == probe_lines(
        real_augment, "p-resumed", "weights-rank0.txt"
    )


def test_rerun_of_a_finished_run_changes_nothing_and_more_steps_continue_it(one_rank, shards, tmp_path):
    # Two copies of the finished run, both at once: the same command again on one, more steps on the other.
    output, longer = tmp_path / "again" / "straight", tmp_path / "more" / "straight"
    shutil.copytree(one_rank.base / "straight", output)
    shutil.copytree(one_rank.base / "straight", longer)
    before = folder_digest(output)
    assert folder_digest(longer) == before
    args = pretrain_args(shards, output, MAX_STEPS, "--save_steps", "2", "--dataloader_num_workers", "1")
    more = pretrain_args(shards, longer, MAX_STEPS + 2, "--save_steps", "2", "--dataloader_num_workers", "1")
    result, continued = together(
        (run, [sys.executable, "scripts/pretrain.py", *args]), (run, [sys.executable, "scripts/pretrain.py", *more])
    )
    assert "finished run of 8 steps" in result.stdout
    assert folder_digest(output) == before
    assert f"Resuming from {longer / f'checkpoint-{MAX_STEPS}'}" in continued.stderr
    summary = json.loads((longer / "simmim_run.json").read_text())
    assert summary["steps_completed"] == MAX_STEPS + 2
    old = json.loads(before["simmim_run.json"])["loss_curve"]
    assert summary["loss_curve"][:MAX_STEPS] == old


def kill_during_save_and_rerun(shards, base: Path) -> subprocess.CompletedProcess:
    """Killed while checkpoint 4 is written (checked here: a failure raises from the test's `.result()`), a legacy
    cut-short checkpoint-5 added, the same command again: its finished process."""
    output = base / "run"
    args = [*PROBE, str(base / "probe"), *pretrain_args(shards, output, 6, "--save_steps", "2",
                                                        "--save_total_limit", "2")]  # fmt: skip
    killed = launch(args, {"SIMMIM_PROBE_KILL_IN_SAVE": "4"})
    assert killed.returncode != 0
    assert (output / ".tmp-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert not (output / "checkpoint-4").exists() and (output / "checkpoint-2" / "trainer_state.json").is_file()
    # A folder written in place by an older version and cut short: weights, no trainer state.
    legacy = output / "checkpoint-5"
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes((output / "checkpoint-2" / "model.safetensors").read_bytes())
    return run(args)


def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(single_runs):
    base, started = single_runs["test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one"]
    output, result = base / "run", started.result()
    legacy = output / "checkpoint-5"
    assert f"Not resuming from {legacy} (incomplete: no trainer_state.json)" in result.stderr
    assert ".tmp-checkpoint-4 (a checkpoint write that never finished)" in result.stderr
    assert f"Resuming from {output / 'checkpoint-2'}" in result.stderr
    assert json.loads((output / "simmim_run.json").read_text())["steps_completed"] == 6
    # save_total_limit 2 keeps the two newest complete checkpoints; nothing half-written is left.
    assert sorted(p.name for p in output.iterdir() if "checkpoint" in p.name) == ["checkpoint-4", "checkpoint-6"]


def test_nonfinite_steps_are_skipped_then_a_streak_stops_the_run(single_runs):
    base, started = single_runs["test_nonfinite_steps_are_skipped_then_a_streak_stops_the_run"]
    output, probe, result = base / "run", base / "probe", started.result()
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, errors  # one line (a progress bar may share it)
    last = errors[0]
    assert last.startswith("error: the loss or gradient norm was NaN/Inf for 3 steps in a row (steps 5-7")
    assert f"Last good checkpoint: {output / 'checkpoint-4'}" in last
    assert (
        "step 3: non-finite loss and gradient norm, optimizer step skipped (1 in a row, 1 in this run)"
        in result.stderr
    )
    digests = {
        int(line.split()[0]): line.split()[1:] for line in (probe / "digests-rank0.txt").read_text().splitlines()
    }
    assert digests[3] == digests[2]  # step 3 changed no weight and no optimizer state
    assert digests[4][0] != digests[3][0] and digests[4][1] != digests[3][1]
    assert digests[6] == digests[5] == digests[4] and 7 not in digests  # step 7 raised before its end
    # The last good checkpoint stays; none is written from a non-finite step; nothing is exported.
    assert json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4
    assert not (output / "checkpoint-6").exists()
    for name in ("encoder", "simmim_run.json", "README.md", "model.safetensors"):
        assert not (output / name).exists(), name
    losses = {entry["step"]: entry["loss"] for entry in json.loads((output / "checkpoint-4" / "trainer_state.json")
                                                                    .read_text())["log_history"] if "loss" in entry}  # fmt: skip
    assert losses[3] != losses[3] and all(losses[step] > 0 for step in (1, 2, 4))  # nan, never 0


def test_single_nonfinite_step_leaves_an_honest_summary(single_runs):
    base, started = single_runs["test_single_nonfinite_step_leaves_an_honest_summary"]
    output, result = base / "run", started.result()
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((output / "simmim_run.json").read_text())
    assert summary["loss_curve"][1] == [2, None] and summary["nonfinite_steps"] == 1
    assert summary["final_loss"] == summary["loss_curve"][2][1] > 0
    assert (output / "encoder" / "model.safetensors").is_file()


def test_processes_that_each_see_world_size_one_stop_at_start(single_runs):
    base, started = single_runs["test_processes_that_each_see_world_size_one_stop_at_start"]
    output, result = base / "run", started.result()
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2" in errors[0]
    assert not output.exists()


def run_script_in_process(script: str, argv: list[str], capsys) -> tuple[int, str]:
    """A script's `main` under `cli.run_script`, in this process (no interpreter start-up): exit status, stderr."""
    import importlib

    from simmim_hf.cli import run_script

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = importlib.import_module(script)
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    with pytest.raises(SystemExit) as exit_info:
        run_script(lambda: module.main(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ("max_stepz: 5\n", "unknown key 'max_stepz'"),
        ("max_steps: five\n", "max_steps: 'five' is not a valid int"),
        ("streaming: maybe\n", "streaming: 'maybe' is not a valid"),
        ("max_steps: [1, 2]\n", "max_steps: expected a single value, got a list"),
        ("save_strategy: sometimes\n", "save_strategy: 'sometimes' is not one of"),
        ("max_steps: [1\n", "not valid YAML"),
    ],
)
def test_config_file_mistakes_name_the_file_and_key(tmp_path, capsys, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    output = tmp_path / "run"
    status, stderr = run_script_in_process("pretrain", ["--config", str(config), "--output_dir", str(output)], capsys)
    assert status == 2
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: --config {config}: ")
    assert message in stderr and not output.exists()


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("pretrain", ["--dataset_name", "no_such_dataset_xyz", "--max_steps", "2"], "error: --dataset_name 'no_such"),
        ("evaluate", ["--model", "pixels", "--dataset_name", "no_such_dataset_xyz"], "error: --dataset_name 'no_such"),
        ("pretrain", ["--max_steps", "lots"], "error: argument --max_steps/--max-steps: invalid int value: 'lots'"),
        ("visualize", ["runs/demo", "a.png", "--bogus", "1"], "error: unrecognized arguments: --bogus 1"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path, capsys, script, argv, message):
    """An unknown dataset (offline here: not on the Hub either) and a mistyped or unknown flag: one `error:` line,
    no usage dump, no traceback, nothing written."""
    output = tmp_path / "run"
    argv = argv + (["--output_dir", str(output), "--report_to", "none"] if script == "pretrain" else [])
    if script == "evaluate":  # scripts/evaluate.py only runs this `main` (its file name shadows the evaluate library)
        from simmim_hf.cli import run_script
        from simmim_hf.eval.run import main

        with pytest.raises(SystemExit) as exit_info:
            run_script(lambda: main(argv))
        status, stderr = exit_info.value.code, capsys.readouterr().err
    else:
        status, stderr = run_script_in_process(script, argv, capsys)
    assert status == 2
    assert stderr.count("\n") == 1 and stderr.startswith(message), stderr
    assert not output.exists()


TOKEN = "hf_" + "A1b2C3d4" * 4


def push_with_a_token_flag(shards, base: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "scripts/push_to_hub.py", str(base), "--repo_id", "a/b", "--hub_token", TOKEN]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_no_token_in_argument_errors(tmp_path, capsys, single_runs):
    token = TOKEN
    # A typo'd flag, and a token given where a number belongs: neither error message shows it.
    for argv in (
        ["--output_dir", str(tmp_path), "--hub_tokn", token],
        ["--output_dir", str(tmp_path), "--max_steps", token],
    ):
        status, stderr = run_script_in_process("pretrain", argv, capsys)
        assert status == 2 and "error" in stderr and token not in stderr
    # The case of the issue, end to end: push_to_hub.py has no token flag at all.
    result = single_runs["test_no_token_in_argument_errors"][1].result()
    assert result.returncode == 2 and result.stderr.startswith("error: ")
    assert token not in result.stdout + result.stderr and "hub_token" in result.stderr


def test_fsdp_final_save_gathers_a_full_state_dict():
    """accelerate enables FSDP only on accelerators (a CPU launch silently becomes DDP), so the sharded run itself is
    checked by scripts/gpu_check.sh; here: under the shipped config's SHARDED_STATE_DICT, the job's final
    `save_model` runs with a full state dict, the one `Trainer.save_model` writes as model.safetensors."""
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    from simmim_hf.pretrain.run import save_full_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    saved_under = []
    trainer = SimpleNamespace(
        is_fsdp_enabled=True,
        accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)),
        save_model=lambda output_dir: saved_under.append(str(plugin.state_dict_type)),
    )
    save_full_model(trainer, "unused")
    assert saved_under == ["StateDictType.FULL_STATE_DICT"]


def test_a_zero_image_std_from_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    output = tmp_path / "run"
    argv = [
        "--preset",
        "demo",
        "--image_mean",
        "0.5",
        "0.5",
        "0.5",
        "--image_std",
        "0.3",
        "0",
        "0.3",
        "--output_dir",
        str(output),
    ]
    status, stderr = run_script_in_process("pretrain", [*argv, "--max_steps", "2", "--report_to", "none"], capsys)
    assert status == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: image_std must be finite and > 0"), stderr
    assert "(--image_mean/--image_std)" in stderr
    assert not output.exists()


def test_a_zero_image_std_measured_on_the_data_is_one_line_and_exit_2(tmp_path, capsys):
    """--image_stats dataset on images of one grey level measures std 0: the config's own check refuses it, naming
    image_std and where the values came from, before anything trains."""
    grey = PIL.Image.new("RGB", (32, 32), (128, 128, 128))
    shard = write_png_tar(tmp_path / "flat" / "train-0.tar", [grey] * 4)
    output = tmp_path / "run"
    argv = ["--preset", "demo", "--dataset_name", "webdataset", "--data_files", str(shard), "--streaming", "true",
            "--image_stats", "dataset", "--output_dir", str(output), "--max_steps", "2", "--report_to", "none"]  # fmt: skip
    status, stderr = run_script_in_process("pretrain", argv, capsys)
    assert status == 2
    assert stderr.count("\n") == 1 and stderr.startswith("error: image_std must be finite and > 0"), stderr
    assert "got [0.0, 0.0, 0.0] (measured on the first 4 images of the stream)" in stderr, stderr
    assert not output.exists()


# Tests whose fault is a run (or a chain of runs) of their own, prepared by `single_runs`.
SINGLE_RUNS = {
    "test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one": kill_during_save_and_rerun,
    "test_nonfinite_steps_are_skipped_then_a_streak_stops_the_run": nonfinite_streak_run,
    "test_single_nonfinite_step_leaves_an_honest_summary": single_nonfinite_run,
    "test_processes_that_each_see_world_size_one_stop_at_start": world_size_one_run,
    "test_no_token_in_argument_errors": push_with_a_token_flag,
}
