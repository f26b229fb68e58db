"""The settings of a resumed run are the run's; finished means finished; launch mistakes are one line.

Every run here is the real job (`simmim_hf.pretrain.run.main`, what scripts/pretrain.py runs) in this process, on a tiny
ViT and 256 Fashion-MNIST images, so a case costs a second or two; user-facing errors go through `cli.run_script`,
as in the script. A finished 8-step run is made once and copied per case.
"""

import errno
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from pretrain_helpers import folder_digest, pretrain_args
from safetensors.torch import load_file

import simmim_hf.pretrain.run as job
import simmim_hf.publish.model_card as model_card
from simmim_hf.cli import run_script
from simmim_hf.errors import RunFault
from simmim_hf.publish.run_dir import RunDir, staged_file

STEPS = 8  # the finished run: 8 steps of 16 images (half a pass of 256), warmup 2, peak LR 0.08 x 16 / 512
IMAGES = 256


def pretrain(argv):
    return job.main([str(item) for item in argv])


def refused(argv, capsys):
    """Runs the job as scripts/pretrain.py does; returns its stderr lines, after checking the exit status 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: pretrain(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


@pytest.fixture(scope="module")
def finished(shards, tmp_path_factory):
    output = tmp_path_factory.mktemp("finished") / "run"
    pretrain(pretrain_args(shards, output, STEPS, "--save_steps", "4"))
    return output


@pytest.fixture
def run_copy(finished, tmp_path):
    output = tmp_path / "run"
    shutil.copytree(finished, output)
    return output


def logged(checkpoint: Path, key: str) -> dict[int, float]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry[key] for entry in history if key in entry and "loss" in entry}


def cosine_lr(peak: float, step: int, warmup: int, total: int) -> float:
    """transformers' cosine with linear warmup, written out: the LR the optimizer step after `step` uses."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


# -- changed settings ----------------------------------------------------------------------------------------------
def test_changed_settings_are_refused_naming_each_difference_and_nothing_is_written(run_copy, shards, capsys):
    before = folder_digest(run_copy)
    argv = pretrain_args(shards, run_copy, 12, "--mask_ratio", "0.4", "--per_device_train_batch_size", "8",
                         "--seed", "3")  # fmt: skip
    lines = refused(argv, capsys)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for difference in ("mask_ratio: 0.6 -> 0.4", "global_batch_size: 16 -> 8", "seed: 7 -> 3"):
        assert difference in lines[0]
    assert "--allow_changed_settings" in lines[0] and "max_steps" not in lines[0]
    assert folder_digest(run_copy) == before


def test_a_refused_resume_into_a_new_folder_leaves_no_folder(finished, shards, tmp_path, capsys):
    output = tmp_path / "elsewhere"
    argv = pretrain_args(shards, output, 12, "--mask_patch_size", "16",
                         "--resume_from_checkpoint", finished / "checkpoint-8")  # fmt: skip
    lines = refused(argv, capsys)
    assert len(lines) == 1 and "mask_patch_size: 8 -> 16" in lines[0]
    assert not output.exists()


def test_allowed_changes_are_recorded_as_segments_with_the_true_images_seen(run_copy, shards):
    summary = pretrain(pretrain_args(shards, run_copy, 12, "--mask_ratio", "0.4", "--per_device_train_batch_size",
                                     "8", "--allow_changed_settings", "true"))  # fmt: skip
    assert summary["steps_completed"] == 12
    assert summary["images_seen"] == 8 * 16 + 4 * 8  # not 12 x 8 (the final batch over the whole run)
    first, second = summary["settings_segments"]
    assert (first["from_step"], first["to_step"], first["global_batch_size"], first["changed"]) == (0, 8, 16, {})
    assert (second["from_step"], second["to_step"], second["global_batch_size"]) == (8, 12, 8)
    assert second["changed"] == {"mask_ratio": [0.6, 0.4], "global_batch_size": [16, 8], "max_steps": [8, 12]}
    assert RunDir(run_copy).read_summary() == summary
    card = RunDir(run_copy).card.read_text()
    assert "| Images seen | 160 |" in card
    assert "steps 0-8, global batch 16<br>steps 8-12, global batch 8 (mask_ratio 0.6 -> 0.4;" in card
    # The record travels with the checkpoint (a resume from it compares with it) and sits in the run folder.
    record = json.loads(RunDir.settings_file(run_copy / "checkpoint-12").read_text())
    assert [segment["from_step"] for segment in record["segments"]] == [0, 8]
    assert json.loads(RunDir(run_copy).settings.read_text()) == record
    # The peak LR follows the new global batch from the first resumed step (the checkpoint restores the old one).
    rates = logged(run_copy / "checkpoint-12", "learning_rate")
    for step in range(9, 13):
        assert rates[step] == pytest.approx(cosine_lr(0.08 * 8 / 512, step - 1, 2, 12), rel=1e-9), step
    # A further resume with the same (changed) settings needs no flag and adds no segment but the new max_steps.
    summary = pretrain(pretrain_args(shards, run_copy, 14, "--mask_ratio", "0.4", "--per_device_train_batch_size",
                                     "8"))  # fmt: skip
    assert [s["changed"] for s in summary["settings_segments"]][2:] == [{"max_steps": [12, 14]}]
    assert summary["images_seen"] == 8 * 16 + 6 * 8


def test_a_changed_file_list_is_allowed_logged_and_recorded(run_copy, shards, caplog):
    with caplog.at_level(logging.INFO):
        summary = pretrain(pretrain_args(shards[:3], run_copy, 10))
    assert f"data_files changed since step 8: 0 added, 1 removed ({shards[3]})" in caplog.text
    assert summary["settings_segments"][1]["changed"] == {"data_files": [shards, shards[:3]], "max_steps": [8, 10]}


# -- a raised max_steps --------------------------------------------------------------------------------------------
def test_raised_max_steps_says_how_the_schedule_changes_and_the_epoch_counts_the_whole_run(run_copy, shards, caplog):
    with caplog.at_level(logging.INFO):
        pretrain(pretrain_args(shards, run_copy, 20))
    peak = 0.08 * 16 / 512
    before, after = cosine_lr(peak, STEPS, 2, STEPS), cosine_lr(peak, STEPS, 2, 20)
    assert before == 0 and after > 1e-4
    assert f"LR at step 8: {before:.3g} on the old plan -> {after:.3g} on the new" in caplog.text
    rates = logged(run_copy / "checkpoint-20", "learning_rate")
    for step in range(9, 21):  # the first resumed step already runs on the new plan
        assert rates[step] == pytest.approx(cosine_lr(peak, step - 1, 2, 20), rel=1e-9), step
    # epoch = images consumed / images per pass over the whole run: 16 batches of 16 make a pass of 256.
    epochs = logged(run_copy / "checkpoint-20", "epoch")
    assert epochs == pytest.approx({step: step * 16 / IMAGES for step in range(1, 21)}, abs=1e-6)


# -- finished means finished ---------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for a kill in the middle of a write (raised after part of the file is written)."""


def _partial_export(real):
    def export(model, folder):
        real(model, folder)
        (Path(folder) / "model.safetensors").write_bytes(b"cut")
        raise Killed

    return export


def _partial_grid(model, pixel_values, mask, path):
    Path(path).write_bytes(b"\x89PNG cut")
    raise Killed


def _partial_write(path, data):
    with staged_file(path) as staging:
        staging.write_text(data[: len(data) // 2])
        raise Killed


def _card_disk_full(path, text):
    with staged_file(path) as staging:
        staging.write_text(text[:4096])
        raise OSError(errno.ENOSPC, "No space left on device")


FINISH_FAULTS = {
    "encoder": ("export_encoder", lambda: _partial_export(job.export_encoder), Killed),
    "picture": ("save_reconstruction_grid", lambda: _partial_grid, Killed),
    "summary": ("write_atomic", lambda: _partial_write, Killed),
    "card": ("write_atomic@card", lambda: _card_disk_full, RunFault),  # one line: "cannot finish the run in ..."
}


@pytest.mark.parametrize("where", list(FINISH_FAULTS))
def test_a_finish_cut_short_at_any_step_is_completed_by_the_rerun_without_training(
    where, finished, run_copy, shards, monkeypatch, capsys
):
    run = RunDir(run_copy)
    for piece in (run.summary, run.card, run.reconstruction):  # the state right after the final save
        piece.unlink()
    shutil.rmtree(run.encoder)
    checkpoint = folder_digest(run_copy / "checkpoint-8")
    name, fault, error = FINISH_FAULTS[where]
    target, attribute = (model_card, "write_atomic") if name.endswith("@card") else (job, name)
    argv = pretrain_args(shards, run_copy, STEPS, "--save_steps", "4")
    with monkeypatch.context() as patch:
        patch.setattr(target, attribute, fault())
        with pytest.raises(
            error, match="cannot finish the run in .*no space left on device" if error is RunFault else None
        ):
            pretrain(argv)
    order = [run.encoder, run.reconstruction, run.summary, run.card]
    cut = list(FINISH_FAULTS).index(where)
    assert all(path.exists() for path in order[:cut]) and not any(path.exists() for path in order[cut:])
    assert not list(run_copy.glob(".*tmp-*")), "a failed write left its temporary file"
    (run_copy / f".{run.card.stem}.tmp-99999.md").write_text("left by a SIGKILL")  # what a real kill leaves
    capsys.readouterr()
    summary = pretrain(argv)
    assert "nothing to do" not in capsys.readouterr().out
    assert summary["steps_completed"] == STEPS and run.finish_missing() == []
    assert run.read_summary() == summary
    original = RunDir(finished).read_summary()
    assert summary["loss_curve"] == original["loss_curve"] and summary["images_seen"] == original["images_seen"]
    assert folder_digest(run_copy / "checkpoint-8") == checkpoint  # resumed from it, nothing trained
    exported, reference = (
        load_file(run.encoder / "model.safetensors"),
        load_file(finished / "encoder/model.safetensors"),
    )
    trained = [key for key in reference if not key.startswith("pooler.")]  # the stock pooler is a fresh init
    assert exported.keys() == reference.keys() and all((exported[k] == reference[k]).all() for k in trained)
    assert run.card.read_text().rstrip().endswith("```") and "| Images seen | 128 |" in run.card.read_text()
    assert not list(run_copy.glob(".*tmp-*"))
    # And now it is finished: the same command again does nothing.
    before = folder_digest(run_copy)
    pretrain(argv)
    assert "nothing to do" in capsys.readouterr().out and folder_digest(run_copy) == before


# -- launch mistakes -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
        (["--save_steps", "0"], "--save_steps must be positive"),
        (["--save_steps", "-5"], "--save_steps must be positive"),
        (["--logging_steps", "-1"], "--logging_steps must be positive"),
        ([], "is a file, not a folder"),
    ],
)
def test_launch_mistakes_are_one_line_before_any_data_is_read(flags, message, shards, tmp_path, monkeypatch, capsys):
    output = tmp_path / ("a-file" if not flags else "run")
    if not flags:
        output.write_text("not a folder")
    monkeypatch.setattr(job, "load_pretrain_dataset", lambda *a, **k: pytest.fail("data was read"))
    lines = refused(pretrain_args(shards, output, 4, *flags), capsys)
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert output.is_file() if not flags else not output.exists()


def test_a_usage_error_removes_only_a_folder_this_session_created_and_left_empty(tmp_path):
    from simmim_hf.errors import UsageError
    from simmim_hf.pretrain.run_settings import no_new_folder_on_usage_error

    new, kept = tmp_path / "new", tmp_path / "kept"
    kept.mkdir()
    for folder in (new, kept):
        with pytest.raises(UsageError), no_new_folder_on_usage_error(folder):
            (folder / RunDir.SETTINGS_NAME).parent.mkdir(exist_ok=True)
            (folder / RunDir.SETTINGS_NAME).write_text("{}")
            raise UsageError("refused")
    assert not new.exists() and (kept / RunDir.SETTINGS_NAME).is_file()
