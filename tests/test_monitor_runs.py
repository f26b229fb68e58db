"""End-to-end runs with the kNN monitor on: files and card, kill-and-resume continues the same curve, two gloo ranks
agree and their sharded extraction equals a one-process one, a bad --monitor_dataset stops with exit 2."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from pretrain_helpers import LAUNCH_TWO, PROBE, PROBE_SCRIPT, launch, pretrain_args, run, together

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.pretrain.monitor import encoder_features, prepare_monitor_set
from simmim_hf.publish.run_dir import RunDir

MONITOR = ["--monitor_dataset", "fashion-mnist", "--monitor_steps", "2", "--monitor_train_samples", "40",
           "--monitor_eval_samples", "20", "--save_steps", "2", "--visualize_steps", "2"]  # fmt: skip
ENV = {"SIMMIM_PROBE_MONITOR": "1"}


def monitor_points(output_dir):
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    logged = [[e["step"], e["monitor/knn_top1"]] for e in state["log_history"] if "monitor/knn_top1" in e]
    return RunDir(output_dir).read_summary()["monitor_curve"], logged


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    whole = pretrain_args(shards, root / "whole", 4, *MONITOR)
    cut = pretrain_args(shards, root / "cut", 4, *MONITOR)
    _, killed = together(  # independent (two folders): both at once
        (run, [*PROBE, str(root / "probe-whole"), *whole], ENV),
        (launch, [*PROBE, str(root / "probe-cut"), *cut], {**ENV, "SIMMIM_PROBE_KILL_AT_STEP": "3"}),
    )
    assert killed.returncode != 0
    run([*PROBE, str(root / "probe-resumed"), *cut], env=ENV)
    return SimpleNamespace(root=root, whole=root / "whole", cut=root / "cut")


def test_monitored_run_leaves_its_curve_pictures_and_card(runs):
    summary = RunDir(runs.whole).read_summary()
    curve, logged = monitor_points(runs.whole)
    assert [point[0] for point in curve] == [2, 4] and [point[1] for point in curve] == [32, 64]
    assert [[s, round(v, 6)] for s, _, v in curve] == logged
    assert set(summary["monitor"]["baselines"]) == {"random_init", "raw_pixels"}
    assert summary["monitor"]["final_knn_top1"] == curve[-1][2]
    for name in ("curves.png", "features_pca.png", "features_attention.png"):
        assert (runs.whole / name).is_file(), name
    assert (runs.whole / "features" / "pca-step-2.png").is_file()
    assert (runs.whole / "features" / "attention-step-2.png").is_file()
    card = (runs.whole / "README.md").read_text()
    assert "![Pretraining curves](curves.png)" in card and "features_attention.png" in card
    assert f"| this encoder, end of pretraining | {curve[-1][2]:.3g} |" in card
    # Every training loss line is still there (the monitor's log entry must not swallow the step's loss).
    assert [step for step, _ in summary["loss_curve"]] == [1, 2, 3, 4]


def test_kill_and_resume_continue_the_same_monitor_curve(runs):
    whole_curve, whole_logged = monitor_points(runs.whole)
    cut_curve, cut_logged = monitor_points(runs.cut)
    assert [p[:2] for p in cut_curve] == [p[:2] for p in whole_curve]  # no point missing or twice
    assert [s for s, _ in cut_logged] == [2, 4]
    for (_, _, a), (_, _, b) in zip(whole_curve, cut_curve):
        assert abs(a - b) < 1e-6


def test_two_gloo_ranks_agree_and_the_sharded_extraction_is_the_one_process_one(shards, tmp_path):
    probe = tmp_path / "probe"
    args = pretrain_args(shards, tmp_path / "run", 2, "--monitor_dataset", "fashion-mnist", "--monitor_steps", "2",
                         "--monitor_train_samples", "40", "--monitor_eval_samples", "21", "--per_device_eval_batch_size",
                         "8")  # fmt: skip
    run([*LAUNCH_TWO, PROBE_SCRIPT, str(probe), *args], env={**ENV, "ACCELERATE_USE_CPU": "true"})
    assert (probe / "world-rank0.txt").read_text() == (probe / "world-rank1.txt").read_text() == "2"
    lines = [(probe / f"monitor-rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert lines[0] == lines[1] and [line.split()[0] for line in lines[0]] == ["-1", "2"]
    # The baseline's features, extracted on two shards (61 rows: uneven) and gathered, equal one process's.
    gathered = [torch.load(probe / f"monitor-features-rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(gathered[0], gathered[1]) and gathered[0].shape[0] == 61
    config = SimMIMConfig.from_pretrained(tmp_path / "run")
    model = SimMIMForMaskedImageModeling(config)
    model.load_state_dict(torch.load(probe / "monitor-model-rank0.pt"))
    spec = SimpleNamespace(monitor_dataset="fashion-mnist", monitor_data_files=None, monitor_train_samples=40,
                           monitor_eval_samples=21, seed=7)  # fmt: skip
    alone = encoder_features(model, prepare_monitor_set(spec, config).pixel_values, batch_size=5)
    torch.testing.assert_close(gathered[0], alone, atol=1e-5, rtol=1e-5)


def test_bad_monitor_dataset_stops_with_exit_2_before_training(shards, tmp_path):
    output = tmp_path / "run"
    args = pretrain_args(shards, output, 2, "--monitor_dataset", "fashion-mnist", "--monitor_eval_samples", "20000")
    result = launch([sys.executable, "scripts/pretrain.py", *args])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: --monitor_dataset fashion-mnist: asked for 20000 samples but the split has only 10000"], (
        result.stderr[-2000:]
    )
    assert not output.exists()
