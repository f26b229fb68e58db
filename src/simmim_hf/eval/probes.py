"""Evaluation protocols on frozen features (weighted kNN, linear probe) and their accuracy rows.

Fine-tuning is in `finetune.py`; the driver that runs the protocols is in `run.py`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from simmim_hf.embedding import knn_scores  # noqa: F401  (the kNN lives in the core, shared with the monitor)

METRIC_PATH = Path(__file__).parent.parent / "metrics" / "accuracy.py"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
