"""Downstream evaluation of any image encoder: the driver of `scripts/evaluate.py`.

The encoder is anything `AutoModel.from_pretrained` takes; its preprocessing comes from the `AutoImageProcessor`
saved next to it, so other people's checkpoints work unchanged. `run_evaluation(EvaluationArguments(...))` runs the
requested protocols and returns (and optionally writes) the results JSON read by `simmim_hf.publish.hub`; `main(argv)`
also puts the results into a pretraining run's model card. Arguments are in `arguments.py`, data loading in
`data.py`, encoder loading and feature extraction in `features.py`, the frozen-feature protocols and accuracy rows in
`probes.py`, fine-tuning in `finetune.py`, segmentation and detection in `dense_run.py`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import HfArgumentParser, set_seed

from simmim_hf.cli import parse_arguments
from simmim_hf.data.labelled import EvalData, load_eval_data
from simmim_hf.eval.arguments import DENSE_PROTOCOLS, PIXELS, RAW_PIXELS, EvaluationArguments
from simmim_hf.eval.dense_run import dense_results
from simmim_hf.eval.features import extract_features, load_encoder
from simmim_hf.eval.finetune import finetune_from_args
from simmim_hf.eval.probes import accuracy_results, knn_scores, linear_probe, resolve_device
from simmim_hf.publish.model_card import write_model_card
from simmim_hf.publish.run_dir import RunDir

# Frozen features of the train and eval splits, `(N, D)` and `(M, D)`.
Features = tuple[torch.Tensor, torch.Tensor]


def frozen_features(args: EvaluationArguments, data: EvalData, workdir: str, device: torch.device) -> Features:
    """Loads the encoder (or raw pixels) and extracts the train and eval features `(N, D)`, `(M, D)`."""
    pixels = args.model == PIXELS
    encoder = load_encoder(
        args.model,
        random_init=args.random_init,
        image_processor=args.image_processor,
        pixel_size=(args.image_size or data.native_size) if pixels else None,
        pixel_channels=data.native_channels if pixels else 1,
        seed=args.seed,
        workdir=workdir,
    )
    common = dict(feature_layer=args.feature_layer, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    train = extract_features(encoder, data.train, data.image_column, device=device, desc="train features", **common)
    test = extract_features(encoder, data.eval, data.image_column, device=device, desc="eval features", **common)
    return train, test


def _knn(args: EvaluationArguments, data: EvalData, features: Features, workdir: str, device: torch.device) -> Any:
    """kNN votes `(M, num_classes)` on the frozen features."""
    train, test = features
    labels = torch.as_tensor(data.train_labels)
    return knn_scores(train.to(device), labels, test, data.num_classes, k=args.knn_k, temperature=args.knn_temperature)


def _linear(args: EvaluationArguments, data: EvalData, features: Features, workdir: str, device: torch.device) -> Any:
    """Linear-probe logits `(M, num_classes)` on the frozen features."""
    set_seed(args.seed)
    train, test = features
    return linear_probe(
        train,
        torch.as_tensor(data.train_labels),
        test,
        data.num_classes,
        epochs=args.linear_epochs,
        learning_rate=args.linear_learning_rate,
        batch_size=args.linear_batch_size,
        weight_decay=args.linear_weight_decay,
        optimizer=args.linear_optimizer,
        seed=args.seed,
        device=device,
    )


def _finetune(args: EvaluationArguments, data: EvalData, features: Any, workdir: str, device: torch.device) -> Any:
    """Logits `(M, num_classes)` of the fine-tuned classifier."""
    return finetune_from_args(args, data, workdir)


# Each protocol of `arguments.PROTOCOLS`: its scores `(M, num_classes)` of the eval split, in the results' order.
SCORERS: dict[str, Callable[..., Any]] = {"knn": _knn, "linear": _linear, "finetune": _finetune}


def score_protocols(
    args: EvaluationArguments, data: EvalData, workdir: str, device: torch.device, timings: dict[str, float]
) -> list[dict[str, Any]]:
    """The result rows of `args`' protocols on `data`, each marked with its `baseline` (None for the model itself)
    and the `feature_layer` its frozen features came from (None: `last_hidden_state`; fine-tuning: None)."""
    prefix = f"{args.baseline} " if args.baseline else ""
    row = dict(dataset=args.dataset_name, split=data.eval_split, train_samples=args.train_samples, seed=args.seed)
    results: list[dict[str, Any]] = []
    features = None
    if {"knn", "linear"} & set(args.protocol_list):
        tick = time.perf_counter()
        features = frozen_features(args, data, workdir, device)
        timings[prefix + "features"] = time.perf_counter() - tick
        print(
            f"{prefix}features: {tuple(features[0].shape)} train, {tuple(features[1].shape)} eval "
            f"({timings[prefix + 'features']:.1f}s)"
        )
    for protocol, scorer in SCORERS.items():
        if protocol not in args.protocol_list:
            continue
        tick = time.perf_counter()
        scores = scorer(args, data, features, workdir, device)
        rows = accuracy_results(scores, torch.as_tensor(data.eval_labels), protocol=protocol, **row)
        layer = args.feature_layer if protocol != "finetune" and args.baseline != RAW_PIXELS else None
        results += [{**r, "baseline": args.baseline, "feature_layer": layer} for r in rows]
        timings[prefix + protocol] = time.perf_counter() - tick
    return results


def run_evaluation(args: EvaluationArguments) -> dict[str, Any]:
    """Runs the requested protocols (and, with `--baselines`, the baselines' on the same data); returns the results
    JSON (also written to `args.output` when set)."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    if set(args.protocol_list) & set(DENSE_PROTOCOLS):
        return _run_dense(args, device, started)
    data = load_eval_data(args)
    print(
        f"dataset {args.dataset_name}: {len(data.train)} train / {len(data.eval)} {data.eval_split} images, "
        f"{data.num_classes} classes"
    )
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="simmim_eval_") as workdir:
        for variant in [args, *args.baseline_arguments()]:  # the same data and subsets for each
            results += score_protocols(variant, data, workdir, device, timings)
    payload = {
        "model": args.model,
        "dataset": args.dataset_name,
        "dataset_config": args.dataset_config_name,
        "split": data.eval_split,
        "seed": args.seed,
        "config": asdict(args),
        "results": results,
    }
    print(format_results_table(results))
    timings["total"] = time.perf_counter() - started
    print("timing: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
    if args.output:
        write_results(payload, args.output)
    return payload


def _run_dense(args: EvaluationArguments, device: torch.device, started: float) -> dict[str, Any]:
    """`run_evaluation` for the dense protocols (`eval/dense_run.py`): the same results JSON, plus per-class values."""
    with tempfile.TemporaryDirectory(prefix="simmim_eval_") as workdir:
        results, per_class, split, timings = dense_results(args, workdir, device)
    payload = {
        "model": args.model,
        "dataset": args.dataset_name,
        "dataset_config": args.dataset_config_name,
        "split": split,
        "seed": args.seed,
        "config": asdict(args),
        "results": results,
        "per_class": per_class,
    }
    print(format_results_table(results))
    timings["total"] = time.perf_counter() - started
    print("timing: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
    if args.output:
        write_results(payload, args.output)
    return payload


def format_results_table(results: list[dict[str, Any]]) -> str:
    """A small fixed-width table of result rows."""
    header = ("model", "protocol", "metric", "value", "train_samples", "split")
    rows = [header] + [
        (
            r.get("baseline") or "model",
            r["protocol"],
            r["metric"],
            f"{r['value']:.4f}",
            str(r["train_samples"] or "all"),
            r["split"],
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def write_results(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes the results JSON (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def parse_args(argv: list[str] | None = None) -> EvaluationArguments:
    """`EvaluationArguments` from the command line (or a JSON/YAML file given as the only argument)."""
    argv = sys.argv[1:] if argv is None else argv
    (args,) = parse_arguments(HfArgumentParser(EvaluationArguments), argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`scripts/evaluate.py`: evaluates, and writes the results into the model card of the pretraining run that
    `--model` is (or is the encoder of) unless `--update_model_card false`."""
    args = parse_args(argv)
    payload = run_evaluation(args)
    # A random init of a run's encoder is that run's baseline (its rows say so); raw pixels belong to no run.
    run_dir = None if args.model == PIXELS else RunDir.containing(args.model)
    if run_dir is not None and args.update_model_card:
        # The run's local model card gets the results in its evaluation table and model-index.
        stored = run_dir.merge_eval_results(payload)  # earlier evaluations of this run stay in its card
        print(f"updated the model card {write_model_card(run_dir.path, eval_results=stored)}")
    return payload
