"""`--lr_schedule official`: microsoft/SimMIM's per-step timm cosine and its multistep (`--lr_milestones`, the ViT-B
800-epoch recipe), both from a warmup start LR, checked against the formulas written out here, through the Trainer's
own scheduler, and across a resume from saved scheduler state."""

import bisect
import math
from types import SimpleNamespace

import pytest
import torch
from pretrain_helpers import ROOT
from tiny_configs import tiny_simmim_config
from transformers import HfArgumentParser

from simmim_hf.cli import expand_config_file
from simmim_hf.data.stream import DataArguments
from simmim_hf.errors import UsageError
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.pretrain.arguments import ModelArguments, SimMIMTrainingArguments
from simmim_hf.pretrain.run_settings import CHANGEABLE, current_settings, differences, schedule_name
from simmim_hf.pretrain.trainer import SimMIMTrainer, build_lr_scheduler

# microsoft/SimMIM simmim_pretrain__swin_base__img192_window6__100ep.yaml: BASE_LR 2e-4, WARMUP_LR 1e-6, MIN_LR 1e-5,
# all three scaled by the global batch / 512 (main_simmim.py); here a batch of 4 and a short run.
BASE, WARMUP_LR, MIN_LR, BATCH = 2e-4, 1e-6, 1e-5, 4
WARMUP, TOTAL = 10, 40


def official_lr(step):
    """The LR the official loop trains optimizer step `step` (0-based) at: timm's CosineLRScheduler value at
    t = step - 1 (step_update(t) runs after step t), the warmup start at steps 0 and 1."""
    scale = BATCH / 512
    peak, start, low = BASE * scale, WARMUP_LR * scale, MIN_LR * scale
    t = max(step - 1, 0)
    if t < WARMUP:
        return start + t * (peak - start) / WARMUP
    if t >= TOTAL:
        return low
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * t / TOTAL))


# microsoft/SimMIM simmim_pretrain__vit_base__img224__800ep.yaml: BASE_LR 1e-4, WARMUP_LR 5e-7, 10 warmup epochs of
# 800, multistep x0.1 at epoch 700; here scaled down to 8 warmup steps, a milestone at step 28 of 40.
VIT_BASE, VIT_WARMUP_LR, VIT_WARMUP, VIT_MILESTONE, GAMMA = 1e-4, 5e-7, 8, 28, 0.1


def official_multistep_lr(step):
    """The LR the official loop trains optimizer step `step` at under its MultiStepLRScheduler (lr_scheduler.py):
    at t = step - 1, `warmup_lr_init + t * (base - warmup_lr_init) / warmup_t` while t < warmup_t, else
    `base * gamma ** bisect_right(milestones, t)` - the milestones (epochs x iterations per epoch) count from t = 0."""
    scale = BATCH / 512
    peak, start = VIT_BASE * scale, VIT_WARMUP_LR * scale
    t = max(step - 1, 0)
    if t < VIT_WARMUP:
        return start + t * (peak - start) / VIT_WARMUP
    return peak * GAMMA ** bisect.bisect_right([VIT_MILESTONE], t)


def _trainer(tmp_path, **overrides):
    settings = dict(
        base_learning_rate=BASE, warmup_steps=WARMUP, warmup_start_ratio=WARMUP_LR / BASE,
        min_learning_rate_ratio=MIN_LR / BASE,
    )  # fmt: skip
    settings.update(overrides)
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=BATCH,
        lr_schedule="official", **settings,
    )  # fmt: skip
    trainer = SimMIMTrainer(model=SimMIMForMaskedImageModeling(tiny_simmim_config("vit")), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL)
    return trainer


def _step(trainer):
    trainer.optimizer.step()
    trainer.lr_scheduler.step()


def _lrs_checked_against(trainer, formula) -> list[float]:
    """The LR of every step 0 .. TOTAL + 2 (one LR for all parameter groups), each checked against `formula(step)`."""
    seen = []
    for step in range(TOTAL + 3):
        lrs = {group["lr"] for group in trainer.optimizer.param_groups}
        assert len(lrs) == 1
        seen.append(lrs.pop())
        assert seen[-1] == pytest.approx(formula(step), rel=1e-12, abs=1e-18), step
        _step(trainer)
    return seen


def _resumed_at(build, tmp_path, at: int):
    """A trainer from `build` that trained `at` steps, saved its optimizer and scheduler, and a fresh one from
    `build` that loaded them as the Trainer does at a resume."""
    first = build(tmp_path / "a")
    for _ in range(at):
        _step(first)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save(first.optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(first.lr_scheduler.state_dict(), folder / "scheduler.pt")
    resumed = build(tmp_path / "b")
    resumed.state.global_step = at
    resumed._load_optimizer_and_scheduler(str(folder))
    return resumed


def test_official_schedule_is_the_formula_at_every_step(tmp_path):
    trainer = _trainer(tmp_path)
    assert schedule_name(trainer.args) == "official-cosine"
    seen = _lrs_checked_against(trainer, official_lr)
    scale = BATCH / 512
    # The named points: the warmup start, the end of the warmup, the middle of the run, the end.
    assert seen[0] == seen[1] == pytest.approx(WARMUP_LR * scale)
    assert seen[WARMUP] == pytest.approx(WARMUP_LR * scale + (WARMUP - 1) * (BASE - WARMUP_LR) * scale / WARMUP)
    assert seen[WARMUP + 1] == pytest.approx(
        MIN_LR * scale + 0.5 * (BASE - MIN_LR) * scale * (1 + math.cos(math.pi * WARMUP / TOTAL))
    )
    assert seen[TOTAL // 2 + 1] == pytest.approx((MIN_LR + 0.5 * (BASE - MIN_LR)) * scale)
    assert seen[TOTAL + 1] == seen[TOTAL + 2] == pytest.approx(MIN_LR * scale)
    assert max(seen) < BASE * scale  # the cosine starts at t = 0: the peak itself is never trained at


def test_resume_keeps_the_official_schedule(tmp_path):
    resumed = _resumed_at(_trainer, tmp_path, WARMUP + 7)
    for step in range(WARMUP + 7, TOTAL + 2):
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(official_lr(step), rel=1e-12), step
        _step(resumed)


def _vit_trainer(tmp_path):
    return _trainer(
        tmp_path, base_learning_rate=VIT_BASE, warmup_steps=VIT_WARMUP, warmup_start_ratio=VIT_WARMUP_LR / VIT_BASE,
        min_learning_rate_ratio=0.0, lr_milestones=str(VIT_MILESTONE),
    )  # fmt: skip


def test_official_multistep_is_the_formula_at_every_step(tmp_path):
    trainer = _vit_trainer(tmp_path)
    assert schedule_name(trainer.args) == "official-multistep"
    seen = _lrs_checked_against(trainer, official_multistep_lr)
    scale = BATCH / 512
    peak, start = VIT_BASE * scale, VIT_WARMUP_LR * scale
    # Warmup start (steps 0 and 1), its last step, the peak right after it, and the x0.1 one step after the
    # milestone (the official update after step t = milestone sets the LR of the next step).
    assert seen[0] == seen[1] == pytest.approx(start)
    assert seen[VIT_WARMUP] == pytest.approx(start + (VIT_WARMUP - 1) * (peak - start) / VIT_WARMUP)
    assert seen[VIT_WARMUP + 1] == seen[VIT_MILESTONE] == pytest.approx(peak)
    assert seen[VIT_MILESTONE + 1] == seen[TOTAL + 2] == pytest.approx(peak * GAMMA)


def test_resume_keeps_the_official_multistep_and_detects_a_changed_schedule(tmp_path):
    resumed = _resumed_at(_vit_trainer, tmp_path, VIT_MILESTONE - 2)
    for step in range(VIT_MILESTONE - 2, TOTAL + 2):
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(official_multistep_lr(step), rel=1e-12), step
        _step(resumed)
    # The recorded settings name the schedule, so resuming a cosine run as the multistep is a refused difference.
    model_args = SimpleNamespace(model_name_or_path=None, init_encoder_from=None)
    data_args = SimpleNamespace(
        dataset_name="x", dataset_config_name=None, data_dir=None, train_split="train", image_column="image",
        max_train_samples=None, data_files=None,
    )  # fmt: skip
    config = tiny_simmim_config("vit")
    cosine, multistep = (
        current_settings(model_args, data_args, trainer.args, config)
        for trainer in (_trainer(tmp_path / "c"), _vit_trainer(tmp_path / "d"))
    )
    changed = differences(cosine, multistep)
    assert changed["lr_schedule"] == ["official-cosine", "official-multistep"]
    assert changed["lr_milestones"] == [None, str(VIT_MILESTONE)]
    assert not set(changed) & set(CHANGEABLE)


def test_official_schedule_flags_are_checked(tmp_path):
    with pytest.raises(UsageError, match="min_learning_rate_ratio"):
        SimMIMTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, lr_schedule="official", lr_milestones="50",
            min_learning_rate_ratio=0.05,
        )  # fmt: skip
    with pytest.raises(
        UsageError, match=r"warmup \(10 steps, --warmup_steps\) must end by the first of --lr_milestones \(5\)"
    ):
        SimMIMTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, lr_schedule="official", lr_milestones="5", warmup_steps=10
        )
    # The default warmup (0.1 of max_steps = 100 steps) is checked at parse time too, not when training starts.
    with pytest.raises(UsageError, match=r"warmup \(100 steps, --warmup_steps\) must end by the first"):
        SimMIMTrainingArguments(
            output_dir=str(tmp_path), use_cpu=True, lr_schedule="official", lr_milestones="50", max_steps=1000,
        )  # fmt: skip
    SimMIMTrainingArguments(  # a warmup that ends by the milestone is accepted
        output_dir=str(tmp_path), use_cpu=True, lr_schedule="official", lr_milestones="100", max_steps=1000,
        warmup_steps=0.1,
    )  # fmt: skip
    with pytest.raises(UsageError, match="warmup_start_ratio"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, warmup_start_ratio=0.01)
    with pytest.raises(UsageError, match="lr_schedule"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lr_schedule="timm")


def test_the_vit_base_config_is_the_official_multistep_recipe(tmp_path):
    """configs/pretrain/vit-base-official-in1k.yaml, parsed as scripts/pretrain.py parses it (on one process, as if
    8 of them: the peak is given here), trains at the official ViT-B 800-epoch LR at the warmup and the milestone."""
    argv = expand_config_file(
        ["--config", str(ROOT / "configs/pretrain/vit-base-official-in1k.yaml"), "--use_cpu", "true",
         "--report_to", "none", "--output_dir", str(tmp_path), "--bf16", "false"]
    )  # fmt: skip
    _, _, args = HfArgumentParser(
        (ModelArguments, DataArguments, SimMIMTrainingArguments)
    ).parse_args_into_dataclasses(args=argv)
    assert schedule_name(args) == "official-multistep"
    assert (args.weight_decay, args.max_grad_norm, args.max_steps) == (0.05, 5.0, 500000)
    # The official numbers: 625 iterations per epoch (1,281,167 images / 2048, dropping the last), BASE_LR 1e-4,
    # WARMUP_LR 5e-7 per 512 images, 10 warmup epochs, x0.1 after epoch 700.
    per_epoch, peak, start = 625, 1e-4 * 2048 / 512, 5e-7 * 2048 / 512
    warmup, milestone = 10 * per_epoch, 700 * per_epoch

    def official(step):
        t = max(step - 1, 0)
        if t < warmup:
            return start + t * (peak - start) / warmup
        return peak * 0.1 ** bisect.bisect_right([milestone], t)

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    scheduler = build_lr_scheduler(args, optimizer, args.max_steps)
    for step in (0, 1, 2, warmup - 1, warmup, warmup + 1, warmup + 2, milestone, milestone + 1, milestone + 2, 499999):
        assert peak * scheduler.lr_lambdas[0](step) == pytest.approx(official(step), rel=1e-12), step
