"""The pretraining engine: arguments, optimizer groups, LR scaling and schedules, the Trainer subclass.

The entry script (`scripts/pretrain.py`) only parses arguments and wires these pieces together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .configuration_simmim import to_pair

logger = logging.getLogger(__name__)

# The paper scales the learning rate linearly with the global batch, relative to 512 images.
REFERENCE_BATCH_SIZE = 512


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
    warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "Linear warmup: steps (>= 1) or a fraction of max_steps (< 1). Default: --default_warmup_ratio."
        },
    )
    default_warmup_ratio: float = field(
        default=0.1, metadata={"help": "Warmup as a fraction of max_steps when --warmup_steps is not given."}
    )

    def __post_init__(self) -> None:
        if wants_auto_bf16(self):
            self.bf16 = True
        # Why the warmup is what it is, for the run header: "given" or "default".
        self.warmup_origin = "given" if self.warmup_steps is not None else "default"
        if not 0 <= self.default_warmup_ratio < 1:
            raise ValueError(f"default_warmup_ratio must be in [0, 1), got {self.default_warmup_ratio}")
        if self.warmup_steps is None:
            self.warmup_steps = self.default_warmup_ratio
        super().__post_init__()
        if self.base_learning_rate <= 0:
            raise ValueError(f"base_learning_rate must be positive, got {self.base_learning_rate}")
        self.learning_rate = scaled_learning_rate(
            self.base_learning_rate,
            self.per_device_train_batch_size,
            self.world_size,
            self.gradient_accumulation_steps,
        )
        if self.lr_milestones:
            parse_milestones(self.lr_milestones)  # fail early on a typo
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
    try:
        milestones = sorted(int(step) for step in text.split(",") if step.strip())
    except ValueError as error:
        raise ValueError(f"lr_milestones must be comma-separated integers, got {text!r}") from error
    if not milestones or milestones[0] <= 0:
        raise ValueError(f"lr_milestones must be positive steps, got {text!r}")
    return milestones


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Parameters trained without weight decay: the model's own `no_weight_decay()` set when it has one, else
    every 1-D parameter (biases, norms)."""
    if hasattr(model, "no_weight_decay"):
        return set(model.no_weight_decay())
    return {name for name, param in model.named_parameters() if param.ndim <= 1}


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the no-weight-decay set (weight_decay 0)."""
    skip = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_multistep_lambda(warmup_steps: int, milestones: list[int], gamma: float):
    """LR multiplier: linear warmup from 0, then x gamma at each milestone."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return gamma ** sum(step >= milestone for milestone in milestones)

    return factor


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, floor: float):
    """LR multiplier: linear warmup from 0, then cosine from 1 down to `floor` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class SimMIMTrainer(Trainer):
    """The HF Trainer with SimMIM's no-weight-decay set and schedules; everything else (DDP, FSDP, DeepSpeed,
    mixed precision, checkpoints, logging integrations) is the stock Trainer's."""

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        skip = no_weight_decay_names(model)
        return [name for name, _ in model.named_parameters() if name not in skip]

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        args = self.args
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        optimizer = optimizer if optimizer is not None else self.optimizer
        warmup = args.get_warmup_steps(num_training_steps)
        milestones = parse_milestones(args.lr_milestones) if getattr(args, "lr_milestones", None) else None
        floor = getattr(args, "min_learning_rate_ratio", 0.0)
        if milestones:
            factor = warmup_multistep_lambda(warmup, milestones, args.lr_gamma)
        elif str(args.lr_scheduler_type).endswith("cosine") and floor > 0:
            factor = warmup_cosine_lambda(warmup, num_training_steps, floor)
        else:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler


# Dense bf16 peak FLOP/s per GPU, for MFU (matched on the CUDA device name).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first, so an "L40S" is not read as an "L4".
    return next((PEAK_BF16_FLOPS[key] for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if key in name), None)


def training_flops_per_image(model: nn.Module) -> float:
    """Approximate training FLOPs per image: 6 x (matmul parameters) x tokens for the dense layers, plus
    attention's 12 x layers x tokens^2 x width (plain encoders; Swin's windowed attention is cheaper and ignored)."""
    config = model.config
    encoder_config = config.encoder_config
    height, width = to_pair(config.image_size)
    tokens = (height // config.model_patch_size) * (width // config.model_patch_size)
    matmul_params = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    if encoder_config.model_type in ("swin", "swinv2"):
        return 6.0 * matmul_params * tokens / 16  # tokens shrink 4x per stage; most weights sit in stage 3
    attention = 12.0 * encoder_config.num_hidden_layers * tokens**2 * encoder_config.hidden_size
    return 6.0 * matmul_params * tokens + attention


class ThroughputTrainer(SimMIMTrainer):
    """Adds images/s (and MFU on a known GPU) to every training log line, so TensorBoard and the progress bar
    show them alongside loss, learning rate and gradient norm."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        import time

        now = time.perf_counter()
        step = self.state.global_step
        last = getattr(self, "_throughput_mark", None)
        if "loss" in logs and last is not None and step > last[0]:
            images = (step - last[0]) * self.args.global_batch_size
            rate = images / max(now - last[1], 1e-9)
            logs["images_per_second"] = round(rate, 2)
            peak = peak_flops(self.args.device)
            if peak is not None:
                model = self.accelerator.unwrap_model(self.model)
                logs["mfu"] = round(rate * training_flops_per_image(model) / (peak * self.args.world_size), 4)
        self._throughput_mark = (step, now)
        super().log(logs, start_time)
