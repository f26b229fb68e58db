"""The pretraining engine: arguments, optimizer groups, LR scaling and schedules, the Trainer subclass.

The entry script (`scripts/pretrain.py`) only parses arguments and wires these pieces together.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from simmim_hf.backbones import flops_per_image, no_weight_decay_names
from simmim_hf.configuration_simmim import to_pair
from simmim_hf.errors import TrainingDiverged, UsageError
from simmim_hf.pretrain.checkpoints import (
    STAGING_PREFIX,
    find_resume_checkpoint,
    load_weights_strictly,
    rotate_checkpoints,
)

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
    max_nonfinite_steps: int = field(
        default=20,
        metadata={
            "help": "A step whose loss or gradient norm is NaN/Inf is skipped (no weight or optimizer update) and "
            "counted; after this many in a row the run stops with an error, its last good checkpoint intact."
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


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: decayed weights, and the no-weight-decay set (weight_decay 0; `backbones.no_weight_decay_names`,
    the rule fine-tuning's layer-decay groups use too)."""
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


TRAINING_ARGS_JSON = "training_args.json"
TRAINING_ARGS_PICKLE = "training_args.bin"


class NonFiniteGuard(TrainerCallback):
    """Hands the optimizer step over to `SimMIMTrainer.skip_nonfinite_step` (after clipping, before the update)."""

    def __init__(self, trainer: SimMIMTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The run's total survives a resume through the logged counts.
        self.trainer.nonfinite_steps = max((entry.get("nonfinite_steps", 0) for entry in state.log_history), default=0)
        self.trainer.nonfinite_in_a_row = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.skip_nonfinite_step()


class SimMIMTrainer(Trainer):
    """The HF Trainer with SimMIM's no-weight-decay set and schedules; everything else (DDP, FSDP, DeepSpeed,
    mixed precision, logging integrations) is the stock Trainer's, plus what long runs need:

    * resume restores every weight through transformers' own loading, strictly (any missing or unexpected tensor
      raises), where the stock Trainer loads the on-disk layout non-strictly into renamed modules;
    * checkpoints are written under `.tmp-checkpoint-N/` and renamed to `checkpoint-N` once every process is done;
    * a step whose loss or gradient norm is NaN/Inf is skipped (no update), logged and counted; `max_nonfinite_steps`
      in a row raise `TrainingDiverged`, and no checkpoint is written from a non-finite step;
    * the arguments are saved as token-free `training_args.json`, never as the `training_args.bin` pickle.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self._nonfinite_flag: torch.Tensor | None = None
        self._staging_dir: Path | None = None
        self.add_callback(NonFiniteGuard(self))

    # -- resume -------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        folder = Path(resume_from_checkpoint)
        plain = any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not plain:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        count = load_weights_strictly(target, folder)
        logger.info("Restored all %d weight tensors from %s", count, folder)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # transformers < 5.2x maps the optimizer state to `args.device` when world_size > 1; on CPU processes that is
        # "cpu:0", which torch cannot restore to. Load plain DDP-on-CPU states here, on "cpu".
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if checkpoint is None or sharded or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        if not ((folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file()):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))

    # -- non-finite steps -----------------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite_flag = bad if self._nonfinite_flag is None else self._nonfinite_flag | bad
        return loss

    def _nonfinite_step(self) -> str:
        """What was not finite in the step about to be taken: "" (nothing), "loss" (any micro-batch, any process),
        "gradient norm", or both. One device sync and, with several processes, one tiny all-reduce per step."""
        loss_flag = self._nonfinite_flag
        self._nonfinite_flag = None
        flags = torch.zeros(2, dtype=torch.int32, device=self.args.device)
        if loss_flag is not None:
            flags[0] = loss_flag.reshape(()).to(torch.int32)
        clipped_norm, self._clipped_grad_norm = getattr(self, "_clipped_grad_norm", None), None
        if getattr(self.accelerator, "scaler", None) is None:  # with fp16 loss scaling, the scaler handles overflow
            if clipped_norm is not None:  # the Trainer's clipping just measured it: no second pass over the grads
                if hasattr(clipped_norm, "full_tensor"):  # a DTensor (FSDP2)
                    clipped_norm = clipped_norm.full_tensor()
                norm = torch.as_tensor(clipped_norm, dtype=torch.float32)
                flags[1] = (~torch.isfinite(norm)).to(flags.device, torch.int32)
            else:
                grads = [
                    p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
                ]
                grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                if grads:
                    flags[1] = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(flags.device, torch.int32)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, grad_bad = flags.tolist()
        return " and ".join(name for name, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad)

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # Kept for `_nonfinite_step` (the pre-clip norm of this step's gradients, global under FSDP/DeepSpeed).
        self._clipped_grad_norm = super()._clip_grad_norm(model)
        return self._clipped_grad_norm

    def skip_nonfinite_step(self) -> None:
        """Called before every optimizer step: on a non-finite step, drops the gradients so that the optimizer
        changes no weight and no state (the LR schedule still advances with the step count)."""
        if self.is_deepspeed_enabled:
            return  # DeepSpeed steps inside its engine and has its own overflow handling
        what = self._nonfinite_step()
        if not what:
            self.nonfinite_in_a_row = 0
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        step = self.state.global_step + 1
        limit = getattr(self.args, "max_nonfinite_steps", 20)
        logger.warning(
            "step %d: non-finite %s, optimizer step skipped (%d in a row, %d in this run)",
            step,
            what,
            self.nonfinite_in_a_row,
            self.nonfinite_steps,
        )
        if self.nonfinite_in_a_row >= limit:
            last_good, _ = find_resume_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"the loss or gradient norm was NaN/Inf for {self.nonfinite_in_a_row} steps in a row (steps "
                f"{step - self.nonfinite_in_a_row + 1}-{step}, limit --max_nonfinite_steps {limit}): training stopped. "
                f"Last good checkpoint: {last_good or 'none'}. Lower --base_learning_rate or check the data, then rerun."
            )

    def _maybe_log_save_evaluate(self, tr_loss: Any, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        # The Trainer resets its loss accumulator with `tr_loss -= tr_loss`, which leaves a NaN in place: once logged,
        # a non-finite window must not poison the next ones.
        logged = getattr(self, "_globalstep_last_logged", None) == self.state.global_step
        if self.nonfinite_steps and logged and isinstance(tr_loss, torch.Tensor) and not torch.isfinite(tr_loss).all():
            tr_loss.zero_()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self.nonfinite_steps:
            logs["nonfinite_steps"] = self.nonfinite_steps
        super().log(logs, *args, **kwargs)

    # -- atomic checkpoints -------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging_dir) if self._staging_dir is not None else super()._get_output_dir(trial)

    def write_checkpoint_extras(self, folder: Path) -> None:
        """Hook: files of this process to put into the checkpoint `folder` (called on every process, before the
        Trainer's own files)."""

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        step = self.state.global_step
        if self.nonfinite_in_a_row:
            logger.warning("step %d was non-finite: no checkpoint written, the last good one stays", step)
            return
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:  # leftovers of a write that was killed
            for stale in run_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            (staging / name).mkdir(parents=True, exist_ok=True)
            self.write_checkpoint_extras(staging / name)
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every process has written its files into the staging folder
        final = run_dir / name
        if self.args.should_save:
            if final.exists():  # left by an earlier session that went past the checkpoint resumed from
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Pushes a complete checkpoint folder (`--hub_strategy checkpoint|all_checkpoints`); the final model is
        published once, at the end, by the pretraining job."""
        if self._staging_dir is not None or not self.is_world_process_zero():
            return  # pushed once renamed, by `_save_checkpoint`
        strategy = str(self.args.hub_strategy).split(".")[-1].lower()
        if strategy not in ("checkpoint", "all_checkpoints"):
            return
        pending = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and pending is not None and not pending.is_done():
            return
        from huggingface_hub import HfApi
        from transformers.utils.hub import PushInProgress

        job = HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=checkpoint_folder,
            path_in_repo="last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name,
            commit_message=f"Training in progress, step {self.state.global_step}, checkpoint",
            token=self.args.hub_token,
            run_as_future=True,
            revision=self.args.hub_revision,
        )
        if pending is None or pending.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            pending.jobs.append(job)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:  # the arguments as JSON (tokens redacted by `to_json_string`), not a pickle
            (folder / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
            (folder / TRAINING_ARGS_JSON).write_text(self.args.to_json_string())

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
    """Approximate training FLOPs per image of a SimMIM model, by its backbone's rule
    (`backbones.flops_per_image`) over its matmul parameters and patches per image."""
    config = model.config
    height, width = to_pair(config.image_size)
    tokens = (height // config.model_patch_size) * (width // config.model_patch_size)
    matmul_params = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    return flops_per_image(config, matmul_params, tokens)


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
