"""Downstream evaluation of any image encoder: frozen-feature kNN and linear probe (fine-tuning is in `finetune.py`).

The encoder is anything `AutoModel.from_pretrained` takes; its preprocessing comes from the `AutoImageProcessor`
saved next to it, so other people's checkpoints work unchanged. `run_evaluation(EvaluationArguments(...))` runs the
requested protocols and returns (and optionally writes) the results JSON read by `simmim_hf.publish.hub`. Data loading is
in `eval_data.py`, encoder loading and feature extraction in `features.py`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from simmim_hf.data.sources import DATA_FILES_HELP, FASHION_MNIST
from simmim_hf.eval.data import EvalData, load_eval_data
from simmim_hf.eval.features import PIXELS, Encoder, extract_features, load_encoder

PROTOCOLS = ("knn", "linear", "finetune")
METRIC_PATH = Path(__file__).parent.parent / "metrics" / "accuracy.py"


@dataclass
class EvaluationArguments:
    """Command-line arguments of `scripts/evaluate.py` (also loadable from a JSON/YAML file)."""

    model: str = field(metadata={"help": "AutoModel folder or Hub id, a full SimMIM checkpoint, or 'pixels'."})
    dataset_name: str = field(
        default=FASHION_MNIST,
        metadata={
            "help": "'fashion-mnist' (embedded; also `fashion_mnist`), a Hub id or a builder (imagefolder, parquet, "
            "webdataset)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": DATA_FILES_HELP})
    data_dir: str | None = field(default=None, metadata={"help": "For builders such as imagefolder: the data folder."})
    train_split: str = field(default="train", metadata={"help": "Split the probes/fine-tuning train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split scored (default: validation, else test, else a seeded tenth of train)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when unambiguous)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when unambiguous)."})
    protocols: str = field(default="knn,linear", metadata={"help": "Comma-separated subset of knn,linear,finetune."})
    output: str | None = field(default=None, metadata={"help": "Where to write the results JSON."})
    random_init: bool = field(default=False, metadata={"help": "Same architecture with fresh weights (baseline)."})
    update_model_card: bool = field(
        default=True,
        metadata={
            "help": "When --model is a pretraining run (or its encoder/), write the results into its README.md."
        },
    )
    raw_pixels: bool = field(
        default=False, metadata={"help": "Score raw pixels as features (same as --model pixels)."}
    )
    image_processor: str | None = field(
        default=None, metadata={"help": "AutoImageProcessor to use instead of the model's."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Raw pixels only, without --image_processor: resize side (default: native)."}
    )
    feature_layer: int | None = field(
        default=None,
        metadata={"help": "Hidden state to probe (index into hidden_states, e.g. -2); default: last_hidden_state."},
    )
    train_samples: int | None = field(default=None, metadata={"help": "Seeded class-balanced training subset size."})
    eval_samples: int | None = field(default=None, metadata={"help": "Seeded class-balanced evaluation subset size."})
    seed: int = field(default=0, metadata={"help": "Seed for subsets, probe and fine-tuning."})
    batch_size: int = field(default=64, metadata={"help": "Fine-tuning batch size."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of feature extraction and inference."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN classifier."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(similarity / T)."})
    linear_epochs: int = field(default=100, metadata={"help": "Linear-probe epochs (on cached features)."})
    linear_learning_rate: float = field(default=0.1, metadata={"help": "Linear-probe peak learning rate."})
    linear_optimizer: str = field(default="sgd", metadata={"help": "sgd (momentum 0.9) or adamw."})
    linear_batch_size: int = field(default=256, metadata={"help": "Linear-probe batch size."})
    linear_weight_decay: float = field(default=0.0, metadata={"help": "Linear-probe weight decay."})
    epochs: int = field(default=10, metadata={"help": "Fine-tuning epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Fine-tuning peak learning rate (of the head)."})
    weight_decay: float = field(default=0.05, metadata={"help": "Fine-tuning AdamW weight decay."})
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise LR decay (default 0.65 ViT/BEiT, 0.9 Swin)."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Fine-tuning label smoothing."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fine-tuning warmup, fraction of steps."})
    crop_min_scale: float = field(default=0.67, metadata={"help": "RandomResizedCrop minimum area fraction."})
    drop_path_rate: float | None = field(
        default=0.1, metadata={"help": "Stochastic depth where the model supports it."}
    )
    finetune_output_dir: str | None = field(default=None, metadata={"help": "Keep the fine-tuned classifier here."})
    finetune_layout: str = field(
        default="official",
        metadata={
            "help": "official: fine-tune a BEiT encoder in microsoft/SimMIM's fine-tuning layout (mean pooling, one "
            "relative position table per block copied from the shared one); as-is: the encoder as exported."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets/transformers cache folder."})

    def __post_init__(self) -> None:
        if self.raw_pixels:
            self.model = PIXELS
        unknown = [p for p in self.protocol_list if p not in PROTOCOLS]
        if unknown or not self.protocol_list:
            raise ValueError(f"protocols must be a comma-separated subset of {PROTOCOLS}, got {self.protocols!r}")
        if self.model == PIXELS and "finetune" in self.protocol_list:
            raise ValueError("raw pixels have nothing to fine-tune; use --protocols knn,linear")
        if self.model == PIXELS and self.random_init:
            raise ValueError("--random_init needs a model, not raw pixels")
        if self.finetune_layout not in ("official", "as-is"):
            raise ValueError(f"finetune_layout must be 'official' or 'as-is', got {self.finetune_layout!r}")
        if self.linear_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"linear_optimizer must be 'sgd' or 'adamw', got {self.linear_optimizer!r}")

    @property
    def protocol_list(self) -> list[str]:
        return [p.strip() for p in self.protocols.split(",") if p.strip()]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------- protocols


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN votes `(M, num_classes)`: cosine similarity, the k nearest training points each vote
    `exp(similarity / temperature)` for their class.

    train_features: `(N, D)`, train_labels: `(N,)` int, test_features: `(M, D)`.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)
        sims, idx = (queries @ train.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores).cpu()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    learning_rate: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Trains `BatchNorm1d(affine=False) -> Linear` on frozen features and returns test logits `(M, num_classes)`.

    Cosine schedule with a 10% linear warmup; seeded (init and batch order), so a run is reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = train_features.shape[1]
    # momentum=None: running statistics are the plain average over all training batches, so short probes are not
    # biased towards the (0, 1) initial statistics.
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
    head = nn.Sequential(norm, nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    head.to(device)
    x, y = train_features.float().to(device), train_labels.long().to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    head.train()
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        return head(test_features.float().to(device)).cpu()


# ----------------------------------------------------------------------------------------------------- results


def load_accuracy_metric(config_name: str = "default") -> Any:
    """The project's `evaluate` accuracy metric, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), config_name, keep_in_memory=True)


def accuracy_results(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    protocol: str,
    dataset: str,
    split: str,
    train_samples: int | None,
    seed: int,
) -> list[dict[str, Any]]:
    """Result rows (top-1, and top-5 when there are more than 5 classes). scores: `(M, C)`, labels: `(M,)`."""
    scores = np.asarray(scores, dtype=np.float32)
    num_classes = scores.shape[1]
    top_k = (1, 5) if num_classes > 5 else (1,)
    values = load_accuracy_metric().compute(predictions=scores, references=np.asarray(labels), top_k=top_k)
    return [
        {
            "protocol": protocol,
            "metric": metric,
            "value": float(value),
            "dataset": dataset,
            "split": split,
            "train_samples": train_samples,
            "seed": seed,
        }
        for metric, value in values.items()
    ]


def format_results_table(results: list[dict[str, Any]]) -> str:
    """A small fixed-width table of result rows."""
    header = ("protocol", "metric", "value", "train_samples", "split")
    rows = [header] + [
        (r["protocol"], r["metric"], f"{r['value']:.4f}", str(r["train_samples"] or "all"), r["split"])
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- driver


def _features_for(encoder: Encoder, data: EvalData, args: EvaluationArguments, device: torch.device) -> tuple:
    common = dict(feature_layer=args.feature_layer, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    train = extract_features(encoder, data.train, data.image_column, device=device, desc="train features", **common)
    test = extract_features(encoder, data.eval, data.image_column, device=device, desc="eval features", **common)
    return train, test


def run_evaluation(args: EvaluationArguments) -> dict[str, Any]:
    """Runs the requested protocols; returns the results JSON (also written to `args.output` when set)."""
    from transformers import set_seed

    started = time.perf_counter()
    device = resolve_device(args.device)
    data = load_eval_data(args)
    print(
        f"dataset {args.dataset_name}: {len(data.train)} train / {len(data.eval)} {data.eval_split} images, "
        f"{data.num_classes} classes"
    )
    train_labels, eval_labels = torch.as_tensor(data.train_labels), torch.as_tensor(data.eval_labels)
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    row = dict(dataset=args.dataset_name, split=data.eval_split, train_samples=args.train_samples, seed=args.seed)

    with tempfile.TemporaryDirectory(prefix="simmim_eval_") as workdir:
        frozen = [p for p in args.protocol_list if p in ("knn", "linear")]
        if frozen:
            tick = time.perf_counter()
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
            train_features, eval_features = _features_for(encoder, data, args, device)
            timings["features"] = time.perf_counter() - tick
            print(
                f"features: {tuple(train_features.shape)} train, {tuple(eval_features.shape)} eval "
                f"({timings['features']:.1f}s)"
            )
        if "knn" in frozen:
            tick = time.perf_counter()
            scores = knn_scores(
                train_features.to(device),
                train_labels,
                eval_features,
                data.num_classes,
                k=args.knn_k,
                temperature=args.knn_temperature,
            )
            results += accuracy_results(scores, eval_labels, protocol="knn", **row)
            timings["knn"] = time.perf_counter() - tick
        if "linear" in frozen:
            tick = time.perf_counter()
            set_seed(args.seed)
            logits = linear_probe(
                train_features,
                train_labels,
                eval_features,
                data.num_classes,
                epochs=args.linear_epochs,
                learning_rate=args.linear_learning_rate,
                batch_size=args.linear_batch_size,
                weight_decay=args.linear_weight_decay,
                optimizer=args.linear_optimizer,
                seed=args.seed,
                device=device,
            )
            results += accuracy_results(logits, eval_labels, protocol="linear", **row)
            timings["linear"] = time.perf_counter() - tick
        if "finetune" in args.protocol_list:
            from simmim_hf.eval.finetune import finetune_from_args

            tick = time.perf_counter()
            logits = finetune_from_args(args, data, workdir)
            results += accuracy_results(logits, eval_labels, protocol="finetune", **row)
            timings["finetune"] = time.perf_counter() - tick

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


def write_results(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes the results JSON (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
