"""The settings that define a pretraining run, kept across its sessions: recorded, compared at resume, in segments.

A run is one `output_dir` trained over one or more sessions (killed, rerun, `--max_steps` raised). What defines it -
the model config (encoder included, masking, image size and statistics), the global batch (per device x processes x
accumulation), the seed, the optimisation (base LR, schedule, warmup, weight decay, ...) and the data source - is
recorded when a session starts, in `simmim_settings.json` (`RunDir.settings`) and in every checkpoint
(`RunDir.settings_file`), as a list of segments:

    {"version": 1, "segments": [{"from_step": 0, "settings": {...}, "batch": {...}, "learning_rate": ..,
                                 "changed": {}},
                                {"from_step": 800, ..., "changed": {"mask_ratio": [0.6, 0.4]}}]}

A resume compares this session's settings with the last segment of the checkpoint it resumes from:

* the same: the segment goes on;
* `max_steps` or the `data_files` list changed: allowed, logged, and a new segment starts at the resume step (shards
  added or removed join or leave the stream at its next pass; a raised `max_steps` re-plans the LR schedule, and the
  run header gives the LR at the resume step under the old and the new plan);
* anything else changed: `UsageError` naming each difference (`field: recorded -> now`), before anything is
  written, unless `--allow_changed_settings`, which starts a new segment instead.

The run summary lists the segments (`settings_segments`: steps, global batch, images, what changed) and counts
`images_seen` over them, so a batch changed at a resume is counted at its true value.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simmim_hf.errors import UsageError
from simmim_hf.publish.run_dir import RunDir, write_atomic

logger = logging.getLogger(__name__)

SETTINGS_VERSION = 1
# Settings a resume may change without --allow_changed_settings (logged, and recorded as a new segment).
CHANGEABLE = ("max_steps", "data_files")
# Config entries that do not define the run (bookkeeping, runtime choices, output switches).
_CONFIG_NOISE = {
    "architectures",
    "auto_map",
    "dtype",
    "torch_dtype",
    "transformers_version",
    "use_cache",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "attn_implementation",
}


def _plain(value: Any) -> Any:
    """A JSON value as it reads back (tuples as lists, enums and paths as strings)."""
    return json.loads(json.dumps(value, default=str))


def schedule_name(args: Any) -> str:
    """The run's LR schedule in a word: "official-multistep" / "official-cosine" (`--lr_schedule official` with or
    without `--lr_milestones`), "multistep", else the Trainer's `--lr_scheduler_type`."""
    if getattr(args, "lr_schedule", "trainer") == "official":
        return "official-multistep" if args.lr_milestones else "official-cosine"
    return "multistep" if args.lr_milestones else str(args.lr_scheduler_type).split(".")[-1].lower()


def current_settings(model_args: Any, data_args: Any, args: Any, config: Any) -> dict[str, Any]:
    """This session's run-defining settings, flat (`field -> JSON value`): every config entry that defines the model
    (`encoder.<name>` for the encoder's), then the batch, seed, optimisation and data settings."""
    config_dict = config.to_dict()
    encoder = config_dict.pop("encoder_config", {}) or {}
    settings = {
        key: value for key, value in config_dict.items() if key not in _CONFIG_NOISE and not key.startswith("_")
    }
    settings.update(
        {f"encoder.{key}": value for key, value in encoder.items() if key not in _CONFIG_NOISE and key[0] != "_"}
    )
    settings.update(
        {
            "base_model": model_args.model_name_or_path or model_args.init_encoder_from,
            "global_batch_size": args.global_batch_size,
            "seed": args.seed,
            "base_learning_rate": args.base_learning_rate,
            "lr_schedule": schedule_name(args),
            "warmup_steps": args.warmup_steps,
            "min_learning_rate_ratio": args.min_learning_rate_ratio,
            "warmup_start_ratio": getattr(args, "warmup_start_ratio", 0.0),
            "lr_milestones": args.lr_milestones,
            "lr_gamma": args.lr_gamma,
            "weight_decay": args.weight_decay,
            "adam_beta1": args.adam_beta1,
            "adam_beta2": args.adam_beta2,
            "adam_epsilon": args.adam_epsilon,
            "max_grad_norm": args.max_grad_norm,
            "dataset_name": data_args.dataset_name,
            "dataset_config_name": data_args.dataset_config_name,
            "data_dir": data_args.data_dir,
            "train_split": data_args.train_split,
            "image_column": data_args.image_column,
            "max_train_samples": data_args.max_train_samples,
            "data_files": list(data_args.data_files or []),
            "max_steps": args.max_steps,
        }
    )
    return _plain(settings)


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """`field -> [recorded, now]` for every field both hold with different values (a field only one side has, e.g.
    an encoder entry a newer transformers adds, is not a difference)."""
    return {key: [recorded[key], value] for key, value in now.items() if key in recorded and recorded[key] != value}


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} items]"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def describe(changes: dict[str, list[Any]]) -> str:
    """`mask_ratio: 0.6 -> 0.4; global_batch_size: 32 -> 16`."""
    return "; ".join(f"{key}: {_text(before)} -> {_text(after)}" for key, (before, after) in changes.items())


def _file_changes(before: list[str], after: list[str]) -> str:
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    parts = [
        f"{len(added)} added" + (f" ({', '.join(added[:3])}{', ...' if len(added) > 3 else ''})" if added else "")
    ]
    parts.append(f"{len(removed)} removed" + (f" ({', '.join(removed[:3])})" if removed else ""))
    return ", ".join(parts)


@dataclass
class SessionSettings:
    """What `settle` decided for this session: the record to save (in `output_dir` and every checkpoint), the
    segment this session continues (the checkpoint's last one, before any change), and its changes."""

    record: dict[str, Any]
    previous: dict[str, Any] | None
    changes: dict[str, list[Any]]
    step: int


def new_segment(step: int, settings: dict[str, Any], args: Any, changes: dict[str, list[Any]]) -> dict[str, Any]:
    return {
        "from_step": step,
        "settings": settings,
        "batch": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "num_processes": args.world_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        },
        "learning_rate": args.learning_rate,
        "changed": changes,
    }


def read_record(checkpoint: str | Path) -> dict[str, Any] | None:
    """The settings record saved in `checkpoint`, or None when it holds none (written by an older version)."""
    path = RunDir.settings_file(checkpoint)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable settings record ({error}); resume from another checkpoint") from None
    if record.get("version") != SETTINGS_VERSION or not record.get("segments"):
        raise UsageError(f"{path}: unknown settings record version {record.get('version')!r}")
    return record


def settle(model_args: Any, data_args: Any, args: Any, config: Any, resume: str | None, step: int) -> SessionSettings:
    """Compares this session's settings with those recorded in the `resume` checkpoint (at `step`) and returns the
    record to continue with. Raises `UsageError` naming every difference outside `CHANGEABLE`, unless
    `args.allow_changed_settings`; checks only, writes nothing."""
    now = current_settings(model_args, data_args, args, config)
    recorded = read_record(resume) if resume else None
    if recorded is None:
        if resume:
            logger.warning("%s holds no settings record (an older version): this session's settings are taken "
                           "as the run's", resume)  # fmt: skip
        return SessionSettings({"version": SETTINGS_VERSION, "segments": [new_segment(0, now, args, {})]}, None, {}, 0)
    segments = [segment for segment in recorded["segments"] if segment["from_step"] <= step]
    previous = segments[-1]
    changes = differences(previous["settings"], now)
    refused = {key: value for key, value in changes.items() if key not in CHANGEABLE}
    if refused and not getattr(args, "allow_changed_settings", False):
        raise UsageError(
            f"the run in {Path(resume).parent} was recorded with other settings (checkpoint {Path(resume).name}): "
            f"{describe(refused)}. Resume with the recorded values, choose another --output_dir, or pass "
            "--allow_changed_settings to continue with the new ones as a new segment of the run"
        )
    if not changes:
        return SessionSettings({**recorded, "segments": segments}, previous, {}, step)
    if "data_files" in changes:
        before, after = changes["data_files"]
        logger.info("data_files changed since step %d: %s (the stream takes them in at its next pass)", step,
                    _file_changes(before, after))  # fmt: skip
    if refused:
        logger.warning("Settings changed at step %d (--allow_changed_settings): %s", step, describe(refused))
    # The segments of a checkpoint's record all start before its step (a session saves after training), so the
    # change starts a new one there.
    segments.append(new_segment(step, now, args, changes))
    return SessionSettings({**recorded, "segments": segments}, previous, changes, step)


def save_record(output_dir: str | Path, record: dict[str, Any]) -> Path:
    """Writes the record as the run's `simmim_settings.json` (atomically; the folder is created)."""
    run = RunDir(output_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    return write_atomic(run.settings, json.dumps(record, indent=1) + "\n")


def segments_summary(record: dict[str, Any] | None, steps_completed: int, global_batch: int) -> list[dict[str, Any]]:
    """The run's segments for its summary: from and to which step, the global batch, the images trained on, what
    changed at its start. Without a record: one segment of `steps_completed` x `global_batch`."""
    segments = (record or {}).get("segments") or [{"from_step": 0, "settings": {"global_batch_size": global_batch}}]
    rows = []
    for index, segment in enumerate(segments):
        end = segments[index + 1]["from_step"] if index + 1 < len(segments) else steps_completed
        batch = segment["settings"]["global_batch_size"]
        start = segment["from_step"]
        rows.append(
            {
                "from_step": start,
                "to_step": end,
                "global_batch_size": batch,
                "images": max(0, end - start) * batch,
                "changed": segment.get("changed") or {},
            }
        )
    return rows


# -- the LR schedule at a resume --------------------------------------------------------------------------------------
def lr_at_step(args: Any, learning_rate: float, num_training_steps: int, step: int) -> float:
    """The LR the optimizer step after `step` uses, under the run's schedule planned over `num_training_steps` with peak
    `learning_rate` (the Trainer logs it as `learning_rate` at step `step + 1`)."""
    from simmim_hf.pretrain.trainer import build_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=learning_rate)
    scheduler = build_lr_scheduler(args, optimizer, num_training_steps)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return learning_rate * scheduler.lr_lambdas[0](step)
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def schedule_line(session: SessionSettings, args: Any) -> str | None:
    """The run-header line for a resume whose LR schedule changed (a raised `max_steps`, another peak LR): the LR at
    the resume step under the checkpoint's plan and under this one. None when nothing changed."""
    previous = session.previous
    if previous is None:
        return None
    before_steps, before_lr = previous["settings"]["max_steps"], previous["learning_rate"]
    if before_steps == args.max_steps and before_lr == args.learning_rate:
        return None
    step = session.step
    before = lr_at_step(args, before_lr, before_steps, step)
    after = lr_at_step(args, args.learning_rate, args.max_steps, step)
    what = f"max_steps {before_steps} -> {args.max_steps}" if before_steps != args.max_steps else "same max_steps"
    if before_lr != args.learning_rate:
        what += f", peak LR {before_lr:.3g} -> {args.learning_rate:.3g}"
    return (
        f"schedule resuming at step {step} ({what}): the {schedule_name(args)} schedule is re-planned over "
        f"{args.max_steps} steps; LR at step {step}: {before:.3g} on the old plan -> {after:.3g} on the new"
    )


# -- launch checks and cleanup --------------------------------------------------------------------------------------
def check_numeric_flags(args: Any) -> None:
    """Flags whose value cannot run, refused by name before anything is read: a batch or accumulation below 1, a
    non-positive `--save_steps` / `--logging_steps` (where their strategy is `steps`), an `--output_dir` that is a
    file."""
    if args.per_device_train_batch_size < 1:
        raise UsageError(f"--per_device_train_batch_size must be >= 1, got {args.per_device_train_batch_size}")
    if args.gradient_accumulation_steps < 1:
        raise UsageError(f"--gradient_accumulation_steps must be >= 1, got {args.gradient_accumulation_steps}")
    for name, strategy in (("save_steps", "save_strategy"), ("logging_steps", "logging_strategy")):
        value = getattr(args, name)
        if str(getattr(args, strategy)).split(".")[-1].lower() == "steps" and not value > 0:
            raise UsageError(f"--{name} must be positive (a step count, or a fraction of max_steps below 1), got "
                             f"{value:g}")  # fmt: skip
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output_dir {output} is a file, not a folder; choose another --output_dir")


@contextlib.contextmanager
def no_new_folder_on_usage_error(output_dir: str | Path) -> Iterator[None]:
    """Runs the block; on a `UsageError`, removes `output_dir` when this session created it and it holds nothing but
    the settings record written at the start (so a refused launch leaves no folder behind)."""
    folder = Path(output_dir)
    existed = folder.exists()
    try:
        yield
    except UsageError:
        if not existed and folder.is_dir() and {p.name for p in folder.iterdir()} <= {RunDir.SETTINGS_NAME}:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def pass_length_hint(num_source_images: int | None, max_train_samples: int | None, world_size: int) -> int | None:
    """Images of one pass on one rank, before the first pass has been measured: what prepare_data.py wrote (capped by
    `--max_train_samples`) over the ranks; None when unknown."""
    images = min(filter(None, (num_source_images, max_train_samples)), default=None)
    return max(1, images // max(1, world_size)) if images else None
