"""End-to-end pretraining runs on local shards of real images (Fashion-MNIST), plus the engine's pieces."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from pretrain_helpers import ROOT, TINY, pretrain_args, read_batches, run, together
from tiny_configs import tiny_simmim_config
from transformers import HfArgumentParser

from simmim_hf.cli import expand_config_file
from simmim_hf.data.stream import DataArguments
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.pretrain.arguments import ModelArguments, SimMIMTrainingArguments, scaled_learning_rate
from simmim_hf.pretrain.manifest import seal_checkpoint
from simmim_hf.pretrain.trainer import SimMIMTrainer, warmup_cosine_lambda, warmup_multistep_lambda


def test_pretrain_end_to_end_loss_goes_down_and_outputs_are_written(shards, tmp_path):
    output = tmp_path / "run"
    extra = ("--report_to", "tensorboard", "--visualize_steps", "12")
    result = run([sys.executable, "scripts/pretrain.py", *pretrain_args(shards, output, 24, *extra)])
    summary = json.loads((output / "simmim_run.json").read_text())
    losses = [loss for _, loss in summary["loss_curve"]]
    assert len(losses) == 24
    # Every training log line names its optimizer step, and its loss is the one the summary records for that step.
    logged = {}
    for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines():
        if "{'loss': " in line:
            step, _, rest = line.partition(": {'loss': '")
            logged[int(step.split("step ")[-1])] = float(rest.split("'")[0])
    assert sorted(logged) == list(range(1, 25)), sorted(logged)
    assert all(logged[step] == pytest.approx(loss, rel=1e-3) for step, loss in summary["loss_curve"])
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4, losses
    assert summary["global_batch_size"] == 16 and summary["images_seen"] == 24 * 16
    assert summary["learning_rate"] == pytest.approx(0.08 * 16 / 512)
    for name in ("model.safetensors", "config.json", "encoder/model.safetensors", "encoder/preprocessor_config.json",
                 "reconstruction.png", "README.md"):  # fmt: skip
        assert (output / name).is_file(), name
    model = SimMIMForMaskedImageModeling.from_pretrained(output)
    assert model.config.encoder_config.hidden_size == 32
    assert (output / "reconstructions" / "step-12.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((output / "runs").iterdir())))
    events.Reload()
    assert "reconstruction" in events.Tags()["images"]
    assert {"train/loss", "train/grad_norm", "train/learning_rate", "train/images_per_second"} <= set(
        events.Tags()["scalars"]
    )


def test_two_ranks_read_disjoint_samples_and_keep_identical_weights(shards, tmp_path):
    probe, output = tmp_path / "probe", tmp_path / "run"
    # One DataLoader worker per rank: decoding happens in the workers, each reading its share of its rank's shards.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "tests/pretrain_probe.py", str(probe), *pretrain_args(shards, output, 4, "--dataloader_num_workers", "1")]  # fmt: skip
    run(command, env={"ACCELERATE_USE_CPU": "true"})
    assert (probe / "world-rank0.txt").read_text() == "2" == (probe / "world-rank1.txt").read_text()
    rank0 = {digest for batch in read_batches(probe, 0) for digest in batch}
    rank1 = {digest for batch in read_batches(probe, 1) for digest in batch}
    assert len(rank0) == len(rank1) == 4 * 16
    assert not rank0 & rank1
    assert (probe / "weights-rank0.txt").read_text() == (probe / "weights-rank1.txt").read_text()
    assert json.loads((output / "simmim_run.json").read_text())["global_batch_size"] == 32


def test_resume_continues_the_stream_without_replaying_it(shards, tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    probe_script = [sys.executable, "tests/pretrain_probe.py"]
    buffer = ("--shuffle_buffer_size", "64")  # a real shuffle buffer: its keys are part of the saved position
    together(  # independent (two folders): both at once
        (run, [*probe_script, str(straight), *pretrain_args(shards, tmp_path / "a", 6, *buffer)]),
        (run, [*probe_script, str(first), *pretrain_args(shards, tmp_path / "b", 3, "--save_steps", "3", *buffer)]),
    )
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "stream_state_rank0.json").is_file()
    assert json.loads((checkpoint / "simmim_wall_time.json").read_text())["wall_time_seconds"] > 0
    (checkpoint / "simmim_wall_time.json").write_text(json.dumps({"wall_time_seconds": 1000.0}))
    seal_checkpoint(checkpoint)  # a deliberate edit: sealed again, or resume would refuse the checkpoint as corrupt
    run([*probe_script, str(resumed), *pretrain_args(shards, tmp_path / "b", 6, "--resume_from_checkpoint", str(checkpoint), *buffer)])  # fmt: skip
    before, after, reference = read_batches(first), read_batches(resumed), read_batches(straight)
    assert len(before) == 3 and len(after) == 3
    seen = {digest for batch in before for digest in batch}
    assert not seen & {digest for batch in after for digest in batch}
    assert before + after == reference  # exactly the uninterrupted run's stream
    assert json.loads((tmp_path / "b" / "simmim_run.json").read_text())["images_skipped_at_resume"] == 0
    # The card's wall time adds up the sessions: the first session's time (set to 1000 s above) plus the resumed one.
    assert json.loads((tmp_path / "b" / "simmim_run.json").read_text())["wall_time_seconds"] > 1000


def test_optimizer_groups_exclude_the_no_weight_decay_set(tmp_path):
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    optimizer = SimMIMTrainer(model=model, args=args).create_optimizer()
    names = {id(param): name for name, param in model.named_parameters()}
    decay = {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    no_decay = {
        names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]
    }
    assert no_decay == model.no_weight_decay()
    assert (
        "simmim.encoder.embeddings.mask_token" in no_decay
        and "simmim.encoder.embeddings.position_embeddings" in no_decay
    )
    assert "decoder.0.weight" in decay and all(group["betas"] == (0.9, 0.999) for group in optimizer.param_groups)
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.05}


def test_learning_rate_is_scaled_by_global_batch(tmp_path):
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, gradient_accumulation_steps=4,
        base_learning_rate=2e-4, use_cpu=True, report_to="none",
    )  # fmt: skip
    assert args.learning_rate == pytest.approx(2e-4 * 32 * 4 / 512)
    assert scaled_learning_rate(1e-4, 128, 8, 2) == pytest.approx(1e-4 * 2048 / 512)
    assert (args.max_grad_norm, args.weight_decay, args.adam_beta2) == (5.0, 0.05, 0.999)


def test_schedules_warm_up_then_decay():
    cosine = warmup_cosine_lambda(warmup_steps=10, total_steps=110, floor=0.1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(60) == pytest.approx(0.55) and cosine(110) == pytest.approx(0.1)
    multistep = warmup_multistep_lambda(warmup_steps=5, milestones=[50, 80], gamma=0.1)
    assert [multistep(s) for s in (4, 49, 50, 80)] == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_scheduler_choice_in_trainer(tmp_path):
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, warmup_steps=2,
                                   lr_milestones="6", base_learning_rate=0.512)  # fmt: skip
    trainer = SimMIMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    lrs = []
    for _ in range(8):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.004, 0.008, 0.008, 0.008, 0.008, 0.008, 0.0008, 0.0008])


def test_cosine_floor_is_pinned_at_every_step_and_differs_from_transformers_only_in_the_warmup(tmp_path):
    """The cosine floor (`--min_learning_rate_ratio`) keeps SimMIM's warmup, (step + 1) / warmup, so step 0 trains at
    1/warmup of the peak where transformers' `cosine_with_min_lr` starts at 0 (one step behind); from the end of the
    warmup on it is transformers' schedule exactly."""
    import math

    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    warmup, total, floor = 4, 30, 0.05
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, warmup_steps=warmup,
                                   min_learning_rate_ratio=floor, base_learning_rate=0.512)  # fmt: skip
    trainer = SimMIMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    peak = args.learning_rate
    theirs = get_cosine_with_min_lr_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak), warmup, total, min_lr_rate=floor
    )
    for step in range(total + 1):
        if step < warmup:  # the formula of the original implementation, re-derived
            expected = peak * (step + 1) / warmup
        else:
            progress = min(1.0, (step - warmup) / (total - warmup))
            expected = peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert all(abs(group["lr"] - expected) <= 1e-12 for group in trainer.optimizer.param_groups), step
        if step < warmup:
            assert abs(theirs.get_last_lr()[0] - peak * step / warmup) <= 1e-12, step
        else:
            assert abs(theirs.get_last_lr()[0] - expected) <= 1e-12, step
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        theirs.optimizer.step()
        theirs.step()
    assert trainer.optimizer.param_groups[0]["lr"] >= floor * peak - 1e-12  # never below the floor


def test_yaml_config_with_command_line_override(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "preset: swin-base-window6-192\nmask_ratio: 0.5\ndataset_name: webdataset\n"
        "data_files: [a.tar, b.tar]\noutput_dir: out\nmax_steps: 100\nbf16: false\nper_device_train_batch_size: 8\n"
    )
    parser = HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))
    argv = expand_config_file(
        ["--config", str(config), "--max_steps", "7", "--use_cpu", "true", "--report_to", "none"]
    )
    model_args, data_args, args = parser.parse_args_into_dataclasses(args=argv)
    assert (model_args.preset, model_args.mask_ratio) == ("swin-base-window6-192", 0.5)
    assert data_args.data_files == ["a.tar", "b.tar"]
    assert (args.max_steps, args.per_device_train_batch_size) == (7, 8)
    assert args.learning_rate == pytest.approx(1e-4 * 8 / 512)


def test_config_file_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        expand_config_file(["--config", str(bad)])
    with pytest.raises(ValueError, match="file path"):
        expand_config_file(["--config"])


def test_argparse_scripts_read_config_files_like_the_dataclass_scripts(tmp_path):
    """scripts/convert_official.py and scripts/visualize.py take `--config FILE` through the same reader as
    pretrain/evaluate/prepare_data/push_to_hub: keys are checked against the parser (positional arguments by name),
    command-line flags override the file."""
    import importlib.util

    from simmim_hf.errors import UsageError
    from simmim_hf.publish import official

    def script(name):
        spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    config = tmp_path / "convert.yaml"
    config.write_text("checkpoint: ckpt.pth\noutput_dir: out\npreset: swin-base-window6-192\n")
    args = official.parse_args(["--config", str(config), "--output_dir", "elsewhere"])
    assert (args.checkpoint, args.output_dir, args.preset) == ("ckpt.pth", "elsewhere", "swin-base-window6-192")
    config.write_text("checkpoint: runs/demo\nimages: [a.png, b.png]\nseed: 3\n")
    args = script("visualize").parse_args(["--config", str(config), "--mask_ratio", "0.5"])
    assert (args.checkpoint, args.images, args.seed, args.mask_ratio) == ("runs/demo", ["a.png", "b.png"], 3, 0.5)
    config.write_text("checkpoint: runs/demo\nimages: [a.png]\nseed: three\n")
    with pytest.raises(UsageError, match="seed: 'three' is not a valid int"):
        script("visualize").parse_args(["--config", str(config)])
    config.write_text("checkpoint: ckpt.pth\noutput_dir: out\nmax_stepz: 1\n")
    with pytest.raises(UsageError, match="unknown key 'max_stepz'"):
        official.parse_args(["--config", str(config)])


def test_run_summary_records_every_argument_and_the_config_without_tokens(tmp_path):
    from simmim_hf.pretrain.run import run_summary

    config = tiny_simmim_config("vit")
    token = "hf_" + "x" * 34
    model_args, data_args = ModelArguments(mask_ratio=0.5), DataArguments()
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=3,
                                   hub_token=token, base_learning_rate=0.512)  # fmt: skip
    trainer = SimMIMTrainer(model=SimMIMForMaskedImageModeling(config), args=args)
    summary = run_summary(model_args, data_args, args, config, trainer, "preset")
    assert token not in json.dumps(summary)
    assert not [key for key in summary["arguments"]["training"] if key.endswith("_token")]
    assert summary["arguments"]["training"]["base_learning_rate"] == 0.512
    assert summary["arguments"]["training"]["lr_scheduler_type"] == "cosine"
    assert summary["arguments"]["model"]["mask_ratio"] == 0.5
    assert summary["arguments"]["data"]["dataset_name"] == data_args.dataset_name
    assert summary["config"] == json.loads(json.dumps(config.to_dict()))
    # The flat facts the model card and the resume check read.
    assert (summary["steps_completed"], summary["max_steps"], summary["learning_rate"]) == (0, 3, args.learning_rate)
    assert (summary["backbone"], summary["image_stats_source"], summary["loss_curve"]) == ("vit", "preset", [])


def test_zero_max_steps_is_refused(tmp_path):
    from simmim_hf.pretrain.run import run_pretraining

    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="max_steps"):
        run_pretraining(ModelArguments(), DataArguments(), args)


def test_throughput_is_batch_times_steps_over_the_time_between_log_lines(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import simmim_hf.pretrain.trainer as engine

    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=1, per_device_train_batch_size=12,
        gradient_accumulation_steps=3,
    )  # fmt: skip
    trainer = SimMIMTrainer(model=model, args=args)
    clock = [100.0]  # the engine's clock, set by hand
    monkeypatch.setattr(engine, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer.state.global_step = 2
    trainer.log({"loss": 1.0})
    assert "images_per_second" not in trainer.state.log_history[-1]  # no interval yet
    trainer.state.global_step, clock[0] = 7, 104.0
    trainer.log({"loss": 0.5})
    # 5 steps of 12 x 3 images (one process) in 4 s.
    assert trainer.state.log_history[-1]["images_per_second"] == pytest.approx(5 * 12 * 3 / 4.0, abs=0.01)
    trainer.state.global_step, clock[0] = 8, 106.0
    trainer.log({"loss": 0.4})
    assert trainer.state.log_history[-1]["images_per_second"] == pytest.approx(1 * 12 * 3 / 2.0, abs=0.01)


def test_push_to_hub_flag_publishes_encoder_and_card(shards, tmp_path):
    import secrets

    from hub_server import HubServer

    token = f"hf_{secrets.token_hex(17)}"
    output = tmp_path / "run"
    with HubServer(users={token: ("alice", {})}) as hub:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "TRANSFORMERS_"))}
        # A stale token in the environment: the explicit --hub_token must win over it.
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"), HF_TOKEN="hf_stale000000")
        command = [sys.executable, "scripts/pretrain.py", *pretrain_args(shards, output, 2, "--save_steps", "1"),
                   "--push_to_hub", "true", "--hub_model_id", "alice/tiny-simmim", "--hub_token", token,
                   "--hub_strategy", "checkpoint"]  # fmt: skip
        result = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**env, "CUDA_VISIBLE_DEVICES": ""},
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        repo = hub.state.repos["alice/tiny-simmim"]
        files = repo.commits[repo.refs["main"]]
        commits = [r for r in hub.state.requests if r.method == "POST" and r.path.endswith("/commit/main")]
    # The checkpoints (pushed by the Trainer for resuming elsewhere) carry the arguments as JSON, never the pickle.
    assert "last-checkpoint/trainer_state.json" in files and "last-checkpoint/training_args.json" in files
    assert not [name for name in files if name.endswith("training_args.bin")]
    assert len(commits) >= 2  # the checkpoint pushes, then the final encoder + card in one commit
    assert files["model.safetensors"] == (output / "encoder" / "model.safetensors").read_bytes()
    card = files["README.md"].decode()
    assert 'AutoModel.from_pretrained("alice/tiny-simmim")' in card and "library_name: transformers" in card
    assert {"config.json", "preprocessor_config.json", "reconstruction.png"} <= set(files)
    assert token not in result.stdout + result.stderr
    # Not in any file of the run either (training_args.bin is pickled into every checkpoint).
    leaks = [path for path in output.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]
    assert not leaks, leaks


def test_bf16_is_chosen_only_on_capable_gpus(monkeypatch):
    from types import SimpleNamespace

    import simmim_hf.pretrain.arguments as training

    flags = dict(auto_bf16=True, bf16=False, fp16=False, use_cpu=False)
    monkeypatch.setattr(training, "bf16_capable_gpu", lambda: True)
    assert training.wants_auto_bf16(SimpleNamespace(**flags))
    assert not training.wants_auto_bf16(SimpleNamespace(**{**flags, "fp16": True}))
    assert not training.wants_auto_bf16(SimpleNamespace(**{**flags, "use_cpu": True}))
    assert not training.wants_auto_bf16(SimpleNamespace(**{**flags, "auto_bf16": False}))
    monkeypatch.setattr(training, "bf16_capable_gpu", lambda: False)
    assert not training.wants_auto_bf16(SimpleNamespace(**flags))


def test_visualize_script_writes_the_grid(tmp_path):
    from PIL import Image
    from skimage import data as photos

    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    model.save_pretrained(tmp_path / "ckpt")
    paths = []
    for name in ("astronaut", "camera"):  # an RGB and a greyscale photo
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(photos, name)()).save(paths[-1])
    output = tmp_path / "grid.png"
    run([sys.executable, "scripts/visualize.py", str(tmp_path / "ckpt"), *map(str, paths), "--output", str(output)])
    grid = Image.open(output)
    # 3 rows (original, masked, reconstruction) x 2 columns of 32 px images, 2 px padding, upscaled x4.
    assert grid.size == ((2 * 34 + 2) * 4, (3 * 34 + 2) * 4)
    pixels = torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.int16))[::4, ::4]  # back to 1x

    def panel(row: int, column: int) -> torch.Tensor:  # (32, 32, 3)
        top, left = 2 + row * 34, 2 + column * 34
        return pixels[top : top + 32, left : left + 32]

    cell = model.config.mask_patch_size
    for column in range(2):
        original, masked, reconstruction = panel(0, column), panel(1, column), panel(2, column)
        assert original.float().std() > 10  # a photo, not a blank panel
        # A cell is masked when the masked-input panel shows it flat grey (0.5) there.
        cells = masked.reshape(32 // cell, cell, 32 // cell, cell, 3).permute(0, 2, 1, 3, 4)
        is_masked = ((cells - 128).abs() <= 1).flatten(2).all(-1)  # (4, 4)
        assert 0 < is_masked.sum() < is_masked.numel()
        pixel_mask = is_masked.repeat_interleave(cell, 0).repeat_interleave(cell, 1).unsqueeze(-1).expand(-1, -1, 3)
        # Visible cells: the masked input and the reconstruction are the original, to the 8-bit level.
        assert (masked - original)[~pixel_mask].abs().max() <= 1
        assert (reconstruction - original)[~pixel_mask].abs().max() <= 1
        # Masked cells: the (untrained) model's painting, not the original.
        assert (reconstruction - original)[pixel_mask].abs().float().mean() > 5


def test_map_style_dataset_pretrains(tmp_path):
    output = tmp_path / "run"
    run([sys.executable, "scripts/pretrain.py", "--preset", "demo", "--config_overrides", TINY,
         "--dataset_name", "fashion-mnist", "--streaming", "false", "--max_train_samples", "64",
         "--output_dir", str(output), "--max_steps", "3", "--per_device_train_batch_size", "16",
         "--report_to", "none", "--num_visualize_images", "2"])  # fmt: skip
    assert json.loads((output / "simmim_run.json").read_text())["steps_completed"] == 3
    assert (output / "encoder" / "model.safetensors").is_file()


def test_config_overrides_accept_lists_and_reject_unknown_fields():
    from simmim_hf.cli import parse_overrides
    from simmim_hf.pretrain.run import build_config

    assert parse_overrides("depths=[1,1,2,1],drop_path_rate=0.1,hidden_act=gelu") == {
        "depths": [1, 1, 2, 1],
        "drop_path_rate": 0.1,
        "hidden_act": "gelu",
    }
    config = build_config(ModelArguments(preset="swin-base-window6-192", config_overrides="depths=[1,1,2,1]"))
    assert list(config.encoder_config.depths) == [1, 1, 2, 1]
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("depths")


def test_checkpoint_config_overrides_are_validated(tmp_path):
    from simmim_hf.pretrain.run import build_config

    tiny_simmim_config("vit").save_pretrained(tmp_path)
    config = build_config(ModelArguments(model_name_or_path=str(tmp_path), mask_ratio=0.4, config_overrides="hidden_dropout_prob=0.1"))  # fmt: skip
    assert config.mask_ratio == 0.4 and config.encoder_config.hidden_dropout_prob == 0.1
    with pytest.raises(ValueError, match="not_a_field"):
        build_config(ModelArguments(model_name_or_path=str(tmp_path), config_overrides="not_a_field=1"))
    with pytest.raises(ValueError, match="mask_patch_size"):
        build_config(ModelArguments(model_name_or_path=str(tmp_path), mask_patch_size=12))


def test_non_square_transform(tmp_path):
    from types import SimpleNamespace

    from PIL import Image

    from simmim_hf.data.images import build_pretrain_transform

    config = SimpleNamespace(image_size=[32, 48], num_channels=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    assert build_pretrain_transform(config)(Image.new("L", (28, 28))).shape == (3, 32, 48)


def test_a_warmup_as_long_as_the_run_is_warned_about(tmp_path, caplog):
    """`configs/pretrain/demo.yaml` warms up for 50 steps: a `--max_steps 30` trial would never reach the peak LR."""
    import logging

    from simmim_hf.pretrain.run import check_launch

    def warnings(**overrides):
        args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, **overrides)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="simmim_hf.pretrain.run"):
            check_launch(args)
        return [record.getMessage() for record in caplog.records]

    (message,) = warnings(max_steps=30, warmup_steps=50)
    assert message.startswith("warmup_steps 50 >= max_steps 30: the learning rate never reaches its peak")
    assert warnings(max_steps=30, warmup_steps=29) == []
    assert warnings(max_steps=30) == []  # the default warmup, 10% of max_steps


def test_visualize_a_greyscale_model_on_colour_images_says_so_once_and_shows_no_loading_bar(tmp_path):
    from PIL import Image
    from skimage import data as photos

    SimMIMForMaskedImageModeling(tiny_simmim_config("vit", num_channels=1)).save_pretrained(tmp_path / "ckpt")
    paths = []
    for name in ("astronaut", "coffee", "camera"):  # two colour photos and a greyscale one
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(getattr(photos, name)()).save(paths[-1])
    output = tmp_path / "grid.png"
    result = run([sys.executable, "scripts/visualize.py", str(tmp_path / "ckpt"), *map(str, paths), "--output",
                  str(output)])  # fmt: skip
    console = result.stdout + result.stderr
    note = (
        "note: 2 of 3 image(s) have colour; the model takes 1 channel, so they are converted to greyscale (as in its "
        "pretraining)"
    )
    assert console.count(note) == 1, console
    assert "Loading weights" not in console, console
    assert result.stdout.splitlines() == [note, f"wrote {output} (rows: original, masked input, reconstruction)"]
    assert Image.open(output).size == ((3 * 34 + 2) * 4, (3 * 34 + 2) * 4)
