"""Top-1 and top-k classification accuracy as an `evaluate` metric, loaded by path so it needs no Hub access.

    metric = evaluate.load("src/simmim_hf/metrics/accuracy.py")             # labels or per-class scores
    metric.compute(predictions=logits, references=labels)                   # {"accuracy": .., "top5_accuracy": ..}
    metric = evaluate.load("src/simmim_hf/metrics/accuracy.py", "ranked")   # ranked class ids, best first
    metric.compute(predictions=[[3, 1, 7, 0, 2], ...], references=[1, ...])

Self-contained on purpose: `evaluate` copies this file into its module cache and imports it on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Fraction of examples whose reference label is the predicted label (top-1), or is among the k highest-scored
classes (top-k). Predictions may be class ids (top-1 only), per-class scores/logits of shape (N, C) (top-1 and
top-k for every k < C), or, with the "ranked" configuration, lists of class ids sorted best first (top-k for every
k up to the list length).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: class ids `(N,)`, scores/logits `(N, C)`, or (config "ranked") ranked class ids `(N, K)`.
    references: true class ids `(N,)`.
    top_k: the k values to report. Default: 1 and 5 where 5 is meaningful (C > 5 scores, K >= 5 ranked ids);
        top-1 alone for class-id predictions. A k > 1 with class-id predictions, k >= C with scores, or k > K with
        ranked ids is an error when asked for explicitly.
    sample_weight: optional per-example weights `(N,)`.
Returns:
    accuracy: top-1 accuracy in [0, 1].
    top{k}_accuracy: top-k accuracy in [0, 1] for every other requested k (e.g. `top5_accuracy`).
Examples:
    >>> metric = evaluate.load("src/simmim_hf/metrics/accuracy.py")
    >>> metric.compute(predictions=[[0.1, 0.9], [0.8, 0.2]], references=[1, 1])
    {'accuracy': 0.5}
"""

_CITATION = ""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        if self.config_name == "ranked":
            features: datasets.Features | list[datasets.Features] = datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            )
        elif self.config_name == "default":
            # Tried in order: a plain class id first, then a row of per-class scores.
            features = [
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Value("int64"),
                    }
                ),
            ]
        else:
            raise ValueError(f"unknown configuration {self.config_name!r}; use 'default' or 'ranked'")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=features,
        )

    def _compute(
        self,
        predictions: Sequence,
        references: Sequence[int],
        top_k: int | Sequence[int] | None = None,
        sample_weight: Sequence[float] | None = None,
    ) -> dict[str, float]:
        refs = np.asarray(references, dtype=np.int64)
        preds = np.asarray(predictions)
        if len(refs) == 0:
            raise ValueError("accuracy of an empty set is undefined")
        weights = np.ones(len(refs)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != refs.shape:
            raise ValueError(f"sample_weight has shape {weights.shape}, expected {refs.shape}")
        explicit = top_k is not None
        ks = sorted({int(k) for k in ([top_k] if isinstance(top_k, int) else top_k)}) if explicit else [1, 5]
        if any(k < 1 for k in ks):
            raise ValueError(f"top_k values must be >= 1, got {ks}")

        if preds.ndim == 1:  # class ids
            if explicit and any(k > 1 for k in ks):
                raise ValueError("top-k accuracy with k > 1 needs per-class scores or ranked predictions")
            ranked, limit = preds[:, None], 1
        elif self.config_name == "ranked":
            ranked, limit = preds, preds.shape[1]
        else:  # scores: rank classes by descending score; stable so ties go to the lower class id like argmax
            ranked, limit = np.argsort(-preds, axis=1, kind="stable"), preds.shape[1] - 1
        too_big = [k for k in ks if k > limit]
        if too_big and explicit and ks != [1]:
            raise ValueError(f"top_k={too_big} is not meaningful for predictions of width {preds.shape[1]}")
        ks = [k for k in ks if k <= max(limit, 1)]

        results = {}
        for k in ks:
            hits = (ranked[:, :k] == refs[:, None]).any(axis=1)
            key = "accuracy" if k == 1 else f"top{k}_accuracy"
            results[key] = float(np.sum(weights * hits) / np.sum(weights))
        return results
