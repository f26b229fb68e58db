"""The dense-prediction protocols of `scripts/evaluate.py` (`--protocols segmentation` / `detection`): checks, data,
fine-tuning, and the result rows of the results JSON (`run.run_evaluation` writes them like the other protocols)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from simmim_hf.errors import UsageError
from simmim_hf.eval.arguments import EvaluationArguments
from simmim_hf.eval.dense import has_backbone_class, no_backbone_message
from simmim_hf.eval.dense_data import DenseData, load_dense_data
from simmim_hf.eval.features import resolve_encoder_path

# The metrics of each protocol that become result rows (and model-index entries), in order.
RESULT_METRICS = {
    "segmentation": ("mean_iou", "mean_accuracy", "overall_accuracy"),
    "detection": ("map", "map_50"),
}


def check_backbone(encoder_path: str, model: str) -> None:
    """`UsageError` (before any data is read) when the encoder's family has no transformers backbone class."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(encoder_path)
    if not has_backbone_class(config):
        raise UsageError(no_backbone_message(f"--model {model}", config.model_type))


def _score(args: EvaluationArguments, protocol: str, encoder: str, data: DenseData, workdir: str, device: Any) -> Any:
    common = dict(
        random_init=args.random_init,
        image_processor=args.image_processor,
        hidden_size=args.dense_hidden_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        seed=args.seed,
        num_workers=args.num_workers,
        device=device,
    )
    output_dir = os.path.join(workdir, protocol)
    if protocol == "segmentation":
        from simmim_hf.eval.segmentation import finetune_segmenter

        return finetune_segmenter(
            encoder, data, output_dir, ignore_index=args.ignore_index, reduce_labels=args.reduce_labels, **common
        )
    from simmim_hf.eval.detection import finetune_detector

    return finetune_detector(encoder, data, output_dir, **common)


def dense_results(
    args: EvaluationArguments, workdir: str, device: torch.device
) -> tuple[list[dict[str, Any]], dict[str, Any], str, dict[str, float]]:
    """Runs each dense protocol of `args`: result rows, per-class values `{protocol: {class: value}}`, the eval
    split's name and the seconds each protocol took."""
    import time

    encoder = resolve_encoder_path(args.model, workdir)
    check_backbone(encoder, args.model)
    rows: list[dict[str, Any]] = []
    per_class: dict[str, Any] = {}
    timings: dict[str, float] = {}
    split = ""
    for protocol in args.protocol_list:
        tick = time.perf_counter()
        data = load_dense_data(args, protocol)
        split = data.eval_split
        print(
            f"dataset {args.dataset_name} ({protocol}): {len(data.train)} train / {len(data.eval)} {split} images, "
            f"{data.num_labels} classes"
        )
        values = _score(args, protocol, encoder, data, workdir, device)
        for metric in RESULT_METRICS[protocol]:
            value = float(values[metric])
            if math.isfinite(value):
                rows.append(
                    dict(
                        protocol=protocol,
                        metric=metric,
                        value=value,
                        dataset=args.dataset_name,
                        split=split,
                        train_samples=args.train_samples,
                        seed=args.seed,
                    )
                )
        key = "per_category_iou" if protocol == "segmentation" else "per_category_ap"
        per_class[protocol] = {
            name: (None if not math.isfinite(float(v)) else float(v)) for name, v in zip(data.class_names, values[key])
        }
        timings[protocol] = time.perf_counter() - tick
    return rows, per_class, split, timings
