"""The pretraining job's arguments: `ModelArguments` (which model), `SimMIMTrainingArguments` (SimMIM's Trainer
defaults and learning-rate rule), and the helpers that read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from simmim_hf.cli import parse_overrides
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

# The paper scales the learning rate linearly with the global batch, relative to 512 images.
REFERENCE_BATCH_SIZE = 512
# `--lr_schedule`: "trainer" (the Trainer's `--lr_scheduler_type` or `--lr_milestones`, after SimMIM's warmup) or
# "official" (microsoft/SimMIM's per-step timm cosine from a warmup start LR; `pretrain.trainer.official_cosine_lambda`).
LR_SCHEDULES = ("trainer", "official")


@dataclass
class ModelArguments:
    """Which SimMIM model to pretrain (parsed by `transformers.HfArgumentParser`)."""

    preset: str = field(
        default="demo",
        metadata={"help": "A SimMIMConfig preset: demo, vit-base-patch16-224, swin-base-window6-192, ..."},
    )
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from a SimMIM checkpoint (folder or Hub id) instead of a fresh preset; recorded as "
            "`base_model` in the card."
        },
    )
    init_encoder_from: str | None = field(
        default=None,
        metadata={
            "help": "Continue pretraining a stock encoder (Hub id or folder of a ViT, DeiT, BEiT, Swin or Swinv2 "
            "model, with or without a head): its weights, config and image statistics, a new mask token where it "
            "has none, a new reconstruction head; recorded as `base_model` in the card. Not with "
            "--model_name_or_path."
        },
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Override the preset's mask ratio (0.6)."})
    mask_patch_size: int | None = field(default=None, metadata={"help": "Override the preset's mask cell (32 px)."})
    image_size: int | None = field(default=None, metadata={"help": "Override the preset's image size."})
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Encoder config overrides, e.g. `hidden_size=256,num_hidden_layers=6,drop_path_rate=0.1`."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention kernel: eager, sdpa (default when available), flash_attention_2."}
    )
    image_stats: str | None = field(
        default=None,
        metadata={
            "help": "Normalisation statistics: `preset` (default: the preset's or checkpoint's own), `imagenet`, or "
            "`dataset` (recorded by prepare_data.py next to the shards, else measured on the first "
            "--image_stats_samples images)."
        },
    )
    image_mean: list[float] | None = field(
        default=None, metadata={"help": "Per-channel mean, e.g. `0.5 0.5 0.5` (with --image_std)."}
    )
    image_std: list[float] | None = field(default=None, metadata={"help": "Per-channel std (with --image_mean)."})
    image_stats_samples: int = field(
        default=1000, metadata={"help": "Images measured for `--image_stats dataset` when nothing is recorded."}
    )

    def overrides(self) -> dict[str, Any]:
        """The SimMIM and encoder fields to override (`--mask_ratio`, `--mask_patch_size`, `--image_size`, then
        `--config_overrides`), for `SimMIMConfig.for_pretraining`, which routes and validates them."""
        given = {key: getattr(self, key) for key in ("mask_ratio", "mask_patch_size", "image_size")}
        return {
            **{key: value for key, value in given.items() if value is not None},
            **parse_overrides(self.config_overrides),
        }


@dataclass
class SimMIMTrainingArguments(TrainingArguments):
    """`TrainingArguments` with SimMIM's defaults (AdamW 0.9/0.999, weight decay 0.05, clipping 5.0, cosine with
    warmup) and its learning-rate rule: `learning_rate = base_learning_rate * global_batch / 512`."""

    base_learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "LR for a global batch of 512; the effective `learning_rate` is scaled by global batch / 512 "
            "(per-device batch x processes x gradient accumulation) and overrides --learning_rate."
        },
    )
    min_learning_rate_ratio: float = field(
        default=0.0,
        metadata={"help": "Cosine floor as a fraction of the peak LR (the paper decays to ~0.05 of it)."},
    )
    lr_milestones: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated steps for a multistep schedule (x lr_gamma at each, after warmup), as in the "
            "official ViT-B 800-epoch recipe; replaces --lr_scheduler_type."
        },
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Decay factor at each multistep milestone."})
    lr_schedule: str = field(
        default="trainer",
        metadata={
            "help": "`trainer`: --lr_scheduler_type (or --lr_milestones) after SimMIM's warmup. `official`: "
            "microsoft/SimMIM's per-step timm cosine: linear warmup from --warmup_start_ratio x the peak, cosine "
            "over the whole run (not only after the warmup) down to --min_learning_rate_ratio x the peak "
            "(docs/official_recipe_schedule.md).",
            "choices": ["trainer", "official"],
        },
    )
    warmup_start_ratio: float = field(
        default=0.0,
        metadata={
            "help": "--lr_schedule official: the LR the warmup starts from, as a fraction of the peak (microsoft/"
            "SimMIM's WARMUP_LR / BASE_LR: 1e-6 / 2e-4 = 0.005 for Swin-B 100 epochs)."
        },
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on the no-decay set)."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Schedule after warmup."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Checkpoint every N steps."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep `bool_masked_pos` in batches."})
    visualize_steps: int = field(
        default=0, metadata={"help": "Log an original/masked/reconstruction grid every N steps (0 = only at the end)."}
    )
    num_visualize_images: int = field(default=8, metadata={"help": "Images in the reconstruction grid."})
    auto_bf16: bool = field(
        default=True,
        metadata={"help": "Train in bf16 autocast on a GPU that supports it when neither --bf16 nor --fp16 is given."},
    )
    max_nonfinite_steps: int = field(
        default=20,
        metadata={
            "help": "A step whose loss or gradient norm is NaN/Inf is skipped (no weight or optimizer update) and "
            "counted; after this many in a row the run stops with an error, its last good checkpoint intact."
        },
    )
    preemption_exit_code: int = field(
        default=143,
        metadata={
            "help": "Exit status after SIGTERM or SIGUSR1 (SLURM's --signal) stopped training with a checkpoint "
            "(143 = 128 + SIGTERM, what schedulers and requeue scripts read as preempted). Ctrl-C (SIGINT) exits 130."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={"help": "Always off here: a non-finite loss is logged as nan, never replaced by an average or 0."},
    )
    warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "Linear warmup: steps (>= 1) or a fraction of max_steps (< 1). Default: --default_warmup_ratio."
        },
    )
    allow_changed_settings: bool = field(
        default=False,
        metadata={
            "help": "Resume a run with settings other than those it was recorded with (model, masking, global batch, "
            "seed, optimisation, data source): the change starts a new segment, recorded in the summary and card. "
            "Without it such a resume stops with the differences. A raised --max_steps or a changed --data_files "
            "list needs no flag."
        },
    )
    default_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warmup as a fraction of max_steps when --warmup_steps is not given."}
    )

    def __post_init__(self) -> None:
        if wants_auto_bf16(self):
            self.bf16 = True
        if self.logging_nan_inf_filter:
            logger.warning("--logging_nan_inf_filter is ignored: non-finite losses are logged as nan and skipped")
            self.logging_nan_inf_filter = False
        if self.max_nonfinite_steps < 1:
            raise UsageError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if not 1 <= self.preemption_exit_code <= 255:
            raise UsageError(f"preemption_exit_code must be in 1-255, got {self.preemption_exit_code}")
        # Why the warmup is what it is, for the run header: "given" or "default".
        self.warmup_origin = "given" if self.warmup_steps is not None else "default"
        if not 0 <= self.default_warmup_ratio < 1:
            raise UsageError(f"default_warmup_ratio must be in [0, 1), got {self.default_warmup_ratio}")
        if self.warmup_steps is None:
            self.warmup_steps = self.default_warmup_ratio
        super().__post_init__()
        if self.base_learning_rate <= 0:
            raise UsageError(f"base_learning_rate must be positive, got {self.base_learning_rate}")
        self.learning_rate = scaled_learning_rate(
            self.base_learning_rate,
            self.per_device_train_batch_size,
            self.world_size,
            self.gradient_accumulation_steps,
        )
        if self.lr_milestones:
            parse_milestones(self.lr_milestones)  # fail early on a typo
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.lr_schedule == "official" and self.lr_milestones:
            raise UsageError("--lr_schedule official is the cosine; --lr_milestones belongs to --lr_schedule trainer")
        if self.lr_schedule != "official" and self.warmup_start_ratio:
            raise UsageError("--warmup_start_ratio applies to --lr_schedule official only")
        if not 0 <= self.warmup_start_ratio <= 1 or not 0 <= self.min_learning_rate_ratio <= 1:
            raise UsageError(
                f"--warmup_start_ratio and --min_learning_rate_ratio must be in [0, 1], got "
                f"{self.warmup_start_ratio} and {self.min_learning_rate_ratio}"
            )
        if self.num_visualize_images < 1:
            raise ValueError(f"num_visualize_images must be >= 1, got {self.num_visualize_images}")

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps


def bf16_capable_gpu() -> bool:
    """A CUDA GPU with native bf16 (Ampere or newer), visible to this process."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def wants_auto_bf16(args: Any) -> bool:
    """bf16 "where the hardware has it": asked for (`auto_bf16`), no precision flag given, not forced onto the CPU,
    and a bf16-capable GPU present."""
    return bool(args.auto_bf16 and not (args.bf16 or args.fp16) and not args.use_cpu and bf16_capable_gpu())


def scaled_learning_rate(base_lr: float, per_device_batch: int, world_size: int, accumulation: int) -> float:
    """The paper's linear scaling rule: base_lr * (per-device batch x world size x accumulation) / 512."""
    return base_lr * per_device_batch * world_size * accumulation / REFERENCE_BATCH_SIZE


def parse_milestones(text: str) -> list[int]:
    """`"30000,50000"` -> `[30000, 50000]` (sorted); ValueError naming `lr_milestones` for anything else."""
    try:
        milestones = sorted(int(step) for step in text.split(",") if step.strip())
    except ValueError as error:
        raise ValueError(f"lr_milestones must be comma-separated integers, got {text!r}") from error
    if not milestones or milestones[0] <= 0:
        raise ValueError(f"lr_milestones must be positive steps, got {text!r}")
    return milestones
