"""The pretraining job's arguments: `ModelArguments` (which model), `SimMIMTrainingArguments` (SimMIM's Trainer
defaults and learning-rate rule), and the helpers that read them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import HubStrategy

from simmim_hf.cli import parse_overrides
from simmim_hf.errors import UsageError

logger = logging.getLogger(__name__)

# The paper scales the learning rate linearly with the global batch, relative to 512 images.
REFERENCE_BATCH_SIZE = 512
# `--lr_schedule`: "trainer" (the Trainer's `--lr_scheduler_type` or `--lr_milestones`, after SimMIM's warmup) or
# "official" (microsoft/SimMIM's per-step schedules from a warmup start LR: its timm cosine,
# `pretrain.trainer.official_cosine_lambda`, or with `--lr_milestones` its multistep, `official_multistep_lambda`).
LR_SCHEDULES = ("trainer", "official")


@dataclass
class ModelArguments:
    """Which SimMIM model to pretrain (parsed by `transformers.HfArgumentParser`)."""

    help_section = "SimMIM model"  # its `--help` section (`sectioned_parser`)

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
            "help": "Continue pretraining a stock encoder (Hub id or folder of a ViT, DeiT, BEiT, Swin, Swinv2, "
            "ConvNeXt, ConvNeXt V2 or ResNet model, with or without a head): its weights, config and image "
            "statistics, a new mask token where it has none, a new reconstruction head; recorded as `base_model` in "
            "the card. Not with --model_name_or_path."
        },
    )
    mask_ratio: float | None = field(default=None, metadata={"help": "Override the preset's mask ratio (0.6)."})
    mask_patch_size: int | None = field(default=None, metadata={"help": "Override the preset's mask cell (32 px)."})
    image_size: int | None = field(default=None, metadata={"help": "Override the preset's image size."})
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Encoder config and SimMIM overrides, e.g. `hidden_size=256,num_hidden_layers=6,drop_path_rate=0.1`"
            " or `depths=[2,2,6,2],hidden_sizes=[32,64,128,256],conv_masking=token,loss_type=l2,norm_target=true`."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel, among those the encoder family's stock class declares (docs/cli.md): eager, "
            "sdpa (default where declared), flash_attention_2/3, flex_attention. Another is refused."
        },
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
    warmup) and its learning-rate rule: `learning_rate = base_learning_rate * global_batch / 512` unless given."""

    help_section = "SimMIM training (new flags, and stock Trainer flags with SimMIM's defaults)"

    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Peak learning rate. Default: the linear-scaling rule, --base_learning_rate x global batch / 512 "
            "(global batch = per-device batch x processes x gradient accumulation). Given, it is used as is and "
            "--base_learning_rate is not used; the run header says which rule set the rate."
        },
    )
    base_learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "LR for a global batch of 512: without --learning_rate the peak LR is this x global batch / 512."
        },
    )
    min_learning_rate_ratio: float = field(
        default=0.0,
        metadata={"help": "Cosine floor as a fraction of the peak LR (the paper decays to ~0.05 of it)."},
    )
    lr_milestones: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated steps for a multistep schedule (x lr_gamma at each, counted from step 0), as in "
            "the official ViT-B 800-epoch recipe; replaces --lr_scheduler_type (with --lr_schedule official: the "
            "official multistep)."
        },
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Decay factor at each multistep milestone."})
    lr_schedule: str = field(
        default="trainer",
        metadata={
            "help": "`trainer`: --lr_scheduler_type (or --lr_milestones) after SimMIM's warmup. `official`: "
            "microsoft/SimMIM's per-step schedule: linear warmup from --warmup_start_ratio x the peak, then its "
            "cosine over the whole run (not only after the warmup) down to --min_learning_rate_ratio x the peak, "
            "or with --lr_milestones its multistep (docs/official_recipe_schedule.md).",
            "choices": ["trainer", "official"],
        },
    )
    warmup_start_ratio: float = field(
        default=0.0,
        metadata={
            "help": "--lr_schedule official: the LR the warmup starts from, as a fraction of the peak (microsoft/"
            "SimMIM's WARMUP_LR / BASE_LR: 1e-6 / 2e-4 = 0.005 for Swin-B 100 epochs, 5e-7 / 1e-4 = 0.005 for ViT-B "
            "800 epochs)."
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
        metadata={
            "help": "Off, and refused if set true: a non-finite loss is logged as nan and its step skipped, never "
            "replaced by an average."
        },
    )
    hub_strategy: HubStrategy | str = field(
        default="end",
        metadata={
            "help": "With --push_to_hub: `end` publishes the encoder, processor and card once, at the end; "
            "`checkpoint` and `all_checkpoints` also push each checkpoint as it is saved. `every_save` is refused."
        },
    )
    ignore_data_skip: bool | None = field(
        default=None,
        metadata={
            "help": "Map-style data only (--streaming false): the stock Trainer flag. A streamed run always resumes "
            "its stream from the saved position (no batch replayed or skipped), and refuses this flag."
        },
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
    monitor_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Labelled images for the online kNN monitor, in scripts/evaluate.py's syntax (fashion-mnist, an "
            "image folder, parquet/webdataset with --monitor_data_files, a Hub id). Off when not given."
        },
    )
    monitor_data_files: list[str] | None = field(default=None, metadata={"help": "Files of --monitor_dataset."})
    monitor_steps: int = field(default=500, metadata={"help": "Score the encoder every N steps (0: only at the end)."})
    monitor_train_samples: int = field(
        default=1000, metadata={"help": "Monitor kNN memory: seeded class-balanced images of the train split."}
    )
    monitor_eval_samples: int = field(
        default=500, metadata={"help": "Monitor kNN queries: seeded class-balanced images of the eval split."}
    )

    def __post_init__(self) -> None:
        if wants_auto_bf16(self):
            self.bf16 = True
        refuse_forced_flags(self)
        # Which rule set the peak LR, for the run header: "given" (--learning_rate) or "scaled" (the linear rule).
        self.learning_rate_rule = "scaled" if self.learning_rate is None else "given"
        if self.learning_rate is None:
            self.learning_rate = self.base_learning_rate  # placeholder; scaled below, once the world size is known
        self.ignore_data_skip_given = self.ignore_data_skip is not None
        if self.ignore_data_skip is None:
            self.ignore_data_skip = False
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
        if self.learning_rate_rule == "given" and not self.learning_rate > 0:
            raise UsageError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.learning_rate_rule == "scaled":
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
        if self.lr_schedule == "official" and self.lr_milestones and self.min_learning_rate_ratio:
            raise UsageError(
                "--min_learning_rate_ratio is the official cosine's floor; the official multistep (--lr_milestones) "
                "has none"
            )
        if self.lr_schedule == "official" and self.lr_milestones and (self.warmup_steps >= 1 or self.max_steps > 0):
            # The warmup in steps, a fraction of max_steps included (the default ratio too), checked before any data
            # is read or folder written.
            warmup = self.get_warmup_steps(self.max_steps) if self.max_steps > 0 else int(self.warmup_steps)
            check_official_warmup(warmup, parse_milestones(self.lr_milestones))
        if self.lr_schedule != "official" and self.warmup_start_ratio:
            raise UsageError("--warmup_start_ratio applies to --lr_schedule official only")
        if not 0 <= self.warmup_start_ratio <= 1 or not 0 <= self.min_learning_rate_ratio <= 1:
            raise UsageError(
                f"--warmup_start_ratio and --min_learning_rate_ratio must be in [0, 1], got "
                f"{self.warmup_start_ratio} and {self.min_learning_rate_ratio}"
            )
        if self.num_visualize_images < 1:
            raise ValueError(f"num_visualize_images must be >= 1, got {self.num_visualize_images}")
        if self.monitor_steps < 0:
            raise UsageError(f"monitor_steps must be >= 0, got {self.monitor_steps}")
        for name in ("monitor_train_samples", "monitor_eval_samples"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def global_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps


def refuse_forced_flags(args: Any) -> None:
    """`UsageError` for a Trainer flag this job cannot honour, given explicitly: `--logging_nan_inf_filter true`
    (non-finite losses are logged as nan and skipped) and `--hub_strategy every_save` (the model is published once,
    at the end, or with its checkpoints)."""
    if args.logging_nan_inf_filter:
        raise UsageError(
            "--logging_nan_inf_filter true is not supported: a non-finite loss is logged as nan and its step skipped "
            "(--max_nonfinite_steps), never averaged away"
        )
    if str(args.hub_strategy).split(".")[-1].lower() == "every_save":
        raise UsageError(
            "--hub_strategy every_save is not supported: the run is published once at the end (end), or with every "
            "checkpoint as it is saved (checkpoint, all_checkpoints)"
        )


def check_data_flags(streaming: bool, args: Any) -> None:
    """`UsageError` for `--ignore_data_skip` given for a streamed run (which always resumes its stream from the saved
    position); for map-style data the stock Trainer honours it."""
    if streaming and getattr(args, "ignore_data_skip_given", False):
        raise UsageError(
            "--ignore_data_skip applies to map-style data only (--streaming false): a streamed run always resumes its "
            "stream from the saved position, replaying and skipping no batch"
        )


def learning_rate_rule(args: Any) -> str:
    """How the peak LR was set, for the run header: `--learning_rate` as given, or the linear-scaling rule."""
    if getattr(args, "learning_rate_rule", "scaled") == "given":
        return f"learning rate {args.learning_rate:.3g} (--learning_rate, as given; --base_learning_rate not used)"
    return (
        f"learning rate {args.learning_rate:.3g} = base {args.base_learning_rate:g} x {args.global_batch_size} / "
        f"{REFERENCE_BATCH_SIZE} (linear scaling rule; --learning_rate sets it directly)"
    )


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


def check_official_warmup(warmup_steps: int, milestones: list[int]) -> None:
    """microsoft/SimMIM's multistep requires the warmup to end by the first milestone: `UsageError` otherwise."""
    if milestones and warmup_steps > min(milestones):
        raise UsageError(
            f"--lr_schedule official: the warmup ({warmup_steps} steps, --warmup_steps) must end by the first of "
            f"--lr_milestones ({min(milestones)})"
        )


def parse_milestones(text: str) -> list[int]:
    """`"30000,50000"` -> `[30000, 50000]` (sorted); ValueError naming `lr_milestones` for anything else."""
    try:
        milestones = sorted(int(step) for step in text.split(",") if step.strip())
    except ValueError as error:
        raise ValueError(f"lr_milestones must be comma-separated integers, got {text!r}") from error
    if not milestones or milestones[0] <= 0:
        raise ValueError(f"lr_milestones must be positive steps, got {text!r}")
    return milestones
