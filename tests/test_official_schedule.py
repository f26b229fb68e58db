"""`--lr_schedule official`: microsoft/SimMIM's per-step timm cosine from a warmup start LR, checked against the
formula written out here, through the Trainer's own scheduler, and across a resume from saved scheduler state."""

import math

import pytest
import torch
from tiny_configs import tiny_simmim_config

from simmim_hf.errors import UsageError
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
from simmim_hf.pretrain.run_settings import schedule_name
from simmim_hf.pretrain.trainer import SimMIMTrainer

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


def _trainer(tmp_path, **overrides):
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=BATCH,
        base_learning_rate=BASE, lr_schedule="official", warmup_steps=WARMUP, warmup_start_ratio=WARMUP_LR / BASE,
        min_learning_rate_ratio=MIN_LR / BASE, **overrides,
    )  # fmt: skip
    trainer = SimMIMTrainer(model=SimMIMForMaskedImageModeling(tiny_simmim_config("vit")), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL)
    return trainer


def _step(trainer):
    trainer.optimizer.step()
    trainer.lr_scheduler.step()


def test_official_schedule_is_the_formula_at_every_step(tmp_path):
    trainer = _trainer(tmp_path)
    assert schedule_name(trainer.args) == "official-cosine"
    seen = []
    for step in range(TOTAL + 3):
        lrs = {group["lr"] for group in trainer.optimizer.param_groups}
        assert len(lrs) == 1
        seen.append(lrs.pop())
        assert seen[-1] == pytest.approx(official_lr(step), rel=1e-12, abs=1e-18), step
        _step(trainer)
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
    first = _trainer(tmp_path / "a")
    for _ in range(WARMUP + 7):
        _step(first)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save(first.optimizer.state_dict(), folder / "optimizer.pt")
    torch.save(first.lr_scheduler.state_dict(), folder / "scheduler.pt")
    resumed = _trainer(tmp_path / "b")
    resumed.state.global_step = WARMUP + 7
    resumed._load_optimizer_and_scheduler(str(folder))
    for step in range(WARMUP + 7, TOTAL + 2):
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(official_lr(step), rel=1e-12), step
        _step(resumed)


def test_official_schedule_flags_are_checked(tmp_path):
    with pytest.raises(UsageError, match="lr_milestones"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lr_schedule="official", lr_milestones="5")
    with pytest.raises(UsageError, match="warmup_start_ratio"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, warmup_start_ratio=0.01)
    with pytest.raises(UsageError, match="lr_schedule"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lr_schedule="timm")
