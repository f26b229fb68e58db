"""The online quality monitor: every `--monitor_steps` steps and at the end, the current encoder (eval mode, no
masking, the training precision) embeds a small labelled set and a weighted kNN scores it, with the protocol and
code of `scripts/evaluate.py --protocols knn` (`simmim_hf.embedding`), so both give the same figure on the same
encoder and subsets.

The set (`--monitor_dataset`, the dataset syntax of `scripts/evaluate.py`; seeded class-balanced subsets of
`--monitor_train_samples` / `--monitor_eval_samples`) is checked, decoded and preprocessed once at start, with the
exported encoder's image processor; each rank keeps only its shard (rows `rank::world_size`). Extraction is sharded
and gathered (`all_gather`), so every rank holds all features and computes the identical figure. Points are logged
(`monitor/knn_top1`: console, every `report_to` integration, `trainer_state.json`), so a resumed run continues the
curve of its checkpoint. Random-init and raw-pixel baselines on the same subsets are computed once per session.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from simmim_hf.backbones import num_prefix_tokens
from simmim_hf.data.images import decode_image
from simmim_hf.data.labelled import load_eval_data
from simmim_hf.embedding import knn_scores, pool_tokens, top1_accuracy
from simmim_hf.errors import UsageError
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.publish.convert import image_processor_for

logger = logging.getLogger(__name__)

METRIC = "monitor/knn_top1"
PREPROCESS_CHUNK = 256


@dataclass
class MonitorSet:
    """This rank's share of the monitor images, preprocessed, and the labels of the whole set.

    pixel_values: `(n_local, C, H, W)` float, rows `rank, rank + world_size, ...` of train rows then eval rows.
    """

    pixel_values: torch.Tensor
    train_labels: torch.Tensor
    eval_labels: torch.Tensor
    num_classes: int
    rank: int
    world_size: int
    description: str

    @property
    def total(self) -> int:
        return len(self.train_labels) + len(self.eval_labels)


def monitor_data_spec(args: Any) -> SimpleNamespace:
    """The `load_eval_data` arguments of the monitor set (train split `train`, eval split found as evaluation does)."""
    return SimpleNamespace(
        dataset_name=args.monitor_dataset,
        dataset_config_name=None,
        data_files=args.monitor_data_files,
        data_dir=None,
        cache_dir=None,
        train_split="train",
        eval_split=None,
        image_column=None,
        label_column=None,
        train_samples=args.monitor_train_samples,
        eval_samples=args.monitor_eval_samples,
        seed=args.seed,
    )


def exported_processor(config: Any) -> Any:
    """The image processor exactly as `encoder/` holds it and `AutoImageProcessor` loads it back (evaluation's)."""
    from transformers import AutoImageProcessor

    with tempfile.TemporaryDirectory(prefix="simmim_monitor_") as folder:
        image_processor_for(config).save_pretrained(folder)
        return AutoImageProcessor.from_pretrained(folder)


def prepare_monitor_set(args: Any, config: Any, rank: int = 0, world_size: int = 1) -> MonitorSet | None:
    """Loads, checks and preprocesses this rank's share of the monitor set; None without `--monitor_dataset`.

    A dataset that cannot be read, has no label column, or has fewer images than asked raises `UsageError` naming
    `--monitor_dataset`, before any training.
    """
    if not args.monitor_dataset:
        return None
    name = args.monitor_dataset
    try:
        data = load_eval_data(monitor_data_spec(args))
    except (ValueError, KeyError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"--monitor_dataset {name}: {message}") from error
    processor = exported_processor(config)
    rows = [("train", i) for i in range(len(data.train))] + [("eval", i) for i in range(len(data.eval))]
    mine = rows[rank::world_size]
    chunks = []
    for start in range(0, len(mine), PREPROCESS_CHUNK):
        images = [
            decode_image((data.train if split == "train" else data.eval)[i][data.image_column], config.num_channels)
            for split, i in mine[start : start + PREPROCESS_CHUNK]
        ]
        chunks.append(processor(images=images, return_tensors="pt")["pixel_values"])
    empty = torch.zeros(0, config.num_channels, *_size(config.image_size))
    return MonitorSet(
        pixel_values=torch.cat(chunks) if chunks else empty,
        train_labels=torch.as_tensor(np.asarray(data.train_labels), dtype=torch.long),
        eval_labels=torch.as_tensor(np.asarray(data.eval_labels), dtype=torch.long),
        num_classes=data.num_classes,
        rank=rank,
        world_size=world_size,
        description=f"{name}: {len(data.train)} train / {len(data.eval)} {data.eval_split} images",
    )


def _size(image_size: Any) -> tuple[int, int]:
    return tuple(image_size) if isinstance(image_size, (list, tuple)) else (image_size, image_size)


def gather_rows(local: torch.Tensor, total: int, world_size: int) -> torch.Tensor:
    """All ranks' rows `(total, D)` in set order, from each rank's rows `rank::world_size` `(n_local, D)`.
    Collective when `world_size > 1`: every rank must call it."""
    if world_size == 1:
        return local
    width = -(-total // world_size)
    padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    torch.distributed.all_gather(parts, padded)
    full = torch.empty(total, *local.shape[1:], dtype=local.dtype, device=local.device)
    for rank, part in enumerate(parts):
        count = len(range(rank, total, world_size))
        full[rank::world_size] = part[:count]
    return full


@torch.no_grad()
def encoder_features(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """Mean-pooled patch features `(N, D)` float32 of a SimMIM model's encoder (eval mode, no mask), as
    `scripts/evaluate.py` computes them from the exported encoder. pixel_values: `(N, C, H, W)` normalised."""
    base = model.simmim if isinstance(model, SimMIMForMaskedImageModeling) else model
    prefix = num_prefix_tokens(base.encoder)
    was_training = base.training
    base.eval()
    chunks = []
    try:
        for start in range(0, len(pixel_values), batch_size):
            with autocast():
                hidden = base(pixel_values=pixel_values[start : start + batch_size].to(device)).last_hidden_state
            chunks.append(pool_tokens(hidden, prefix).float())
    finally:
        base.train(was_training)
    if not chunks:
        width = base.encoder.config.hidden_size if hasattr(base.encoder.config, "hidden_size") else 0
        return torch.zeros(0, width, device=device)
    return torch.cat(chunks)


def knn_top1(features: torch.Tensor, monitor: MonitorSet) -> float:
    """Weighted-kNN top-1 of the whole set's features `(total, D)`: train rows first, then eval rows."""
    train, test = features[: len(monitor.train_labels)], features[len(monitor.train_labels) :]
    scores = knn_scores(train, monitor.train_labels, test, monitor.num_classes)
    return top1_accuracy(scores, monitor.eval_labels)


class KNNMonitor(TrainerCallback):
    """Scores the encoder every `every_n_steps` steps (0: only at the end) and at `max_steps`, logging
    `monitor/knn_top1` through the Trainer. Every rank calls it at the same steps (the gather is collective)."""

    def __init__(self, monitor: MonitorSet, every_n_steps: int, batch_size: int) -> None:
        self.monitor = monitor
        self.every_n_steps = every_n_steps
        self.batch_size = batch_size
        self.trainer: Any = None
        self.baselines: dict[str, float] = {}

    def attach(self, trainer: Any) -> KNNMonitor:
        self.trainer = trainer
        return self

    def _autocast(self) -> Any:
        return self.trainer.autocast_smart_context_manager() if self.trainer is not None else contextlib.nullcontext()

    def features(self, model: torch.nn.Module) -> torch.Tensor:
        """The whole set's features `(total, D)`, extracted on this rank's share and gathered (collective)."""
        device = next(model.parameters()).device
        local = encoder_features(model, self.monitor.pixel_values, self.batch_size, device, self._autocast)
        return gather_rows(local.contiguous(), self.monitor.total, self.monitor.world_size)

    def measure(self, model: torch.nn.Module) -> float:
        return knn_top1(self.features(model), self.monitor)

    def compute_baselines(self, config: Any, seed: int, device: torch.device | str) -> dict[str, float]:
        """kNN top-1 of a freshly initialised encoder (seeded, the global RNG untouched) and of the raw preprocessed
        pixels, on the same subsets. Collective."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = SimMIMForMaskedImageModeling(config).to(device)
        random_init = self.measure(fresh)
        del fresh
        pixels = gather_rows(self.monitor.pixel_values.flatten(1).float().to(device), self.monitor.total,
                             self.monitor.world_size)  # fmt: skip
        self.baselines = {"random_init": random_init, "raw_pixels": knn_top1(pixels, self.monitor)}
        logger.info(
            "monitor  %s; kNN top-1 baselines: random init %.4f, raw pixels %.4f",
            self.monitor.description,
            self.baselines["random_init"],
            self.baselines["raw_pixels"],
        )
        return self.baselines

    def due(self, step: int, max_steps: int) -> bool:
        return step == max_steps or (self.every_n_steps > 0 and step % self.every_n_steps == 0)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.trainer is None or not self.due(state.global_step, state.max_steps):
            return
        value = self.measure(self.trainer.accelerator.unwrap_model(self.trainer.model))
        logger.info("monitor  step %d: kNN top-1 %.4f", state.global_step, value)
        # `Trainer.log` clears `control.should_log` (set for this step's loss line, which comes after): keep it.
        should_log = control.should_log
        self.trainer.log({METRIC: round(value, 6)})
        control.should_log = should_log


def monitor_curve(log_history: list[dict[str, Any]], images_at: Callable[[int], int]) -> list[list[Any]]:
    """`[[step, images_seen, knn_top1], ...]` from the Trainer's log history (one point per step, the last kept)."""
    points = {entry["step"]: entry[METRIC] for entry in log_history if METRIC in entry}
    return [[step, images_at(step), points[step]] for step in sorted(points)]
