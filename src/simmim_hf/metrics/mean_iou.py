"""Mean intersection-over-union of semantic segmentation as an `evaluate` metric, loaded by path (no Hub access).

    metric = evaluate.load("src/simmim_hf/metrics/mean_iou.py")
    metric.compute(predictions=[pred_map, ...], references=[label_map, ...], num_labels=11, ignore_index=255)

Keeps the interface of the Hub's `mean_iou` metric. Self-contained on purpose: `evaluate` copies this file into its
module cache and imports it on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Intersection over union of each class, summed over all images: |pred == c and label == c| / |pred == c or
label == c|, counting only pixels whose label is not `ignore_index`. The mean IoU averages it over the classes that
occur in the predictions or the references (a class absent from both is NaN and left out of the mean); the mean
accuracy averages per-class pixel accuracy over the classes present in the references; the overall accuracy is the
fraction of counted pixels predicted right.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label maps, each `(H, W)` of class ids.
    references: ground-truth label maps, each `(H, W)` like its prediction.
    num_labels: number of classes C (ids 0..C-1; other ids in the references are errors unless ignored).
    ignore_index: reference value of pixels left out (e.g. 255).
    nan_to_num: when given, NaN values (classes absent from both) in the outputs are replaced by it.
    label_map: optional {old id: new id} applied to the references first.
    reduce_labels: references' 0 becomes `ignore_index` and every other id decreases by one (ADE20K's "other").
Returns:
    mean_iou, mean_accuracy, overall_accuracy: floats in [0, 1].
    per_category_iou, per_category_accuracy: arrays `(C,)`, NaN for a class absent (from both / from the references).
Examples:
    >>> metric = evaluate.load("src/simmim_hf/metrics/mean_iou.py")
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]], num_labels=2, ignore_index=255)["mean_iou"]
    0.25
"""

_CITATION = ""


def _areas(
    prediction: np.ndarray, reference: np.ndarray, num_labels: int, ignore_index: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class pixel counts `(C,)` of one image: intersection, predicted area, labelled area."""
    if prediction.shape != reference.shape:
        raise ValueError(f"a prediction of shape {prediction.shape} has a reference of shape {reference.shape}")
    keep = reference != ignore_index
    prediction, reference = prediction[keep], reference[keep]
    if reference.size and (reference.min() < 0 or reference.max() >= num_labels):
        raise ValueError(
            f"reference ids must lie in 0..{num_labels - 1} (or be {ignore_index}), got {reference.max()}"
        )
    # An out-of-range prediction is wrong and in no class: it goes to an extra bin that is dropped.
    prediction = np.where((prediction < 0) | (prediction >= num_labels), num_labels, prediction)
    hits = prediction[prediction == reference]
    count = np.bincount
    return (
        count(hits, minlength=num_labels + 1)[:num_labels],
        count(prediction, minlength=num_labels + 1)[:num_labels],
        count(reference, minlength=num_labels)[:num_labels],
    )


class MeanIoU(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        maps = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": maps, "references": maps}),
        )

    def _compute(
        self,
        predictions: Sequence,
        references: Sequence,
        num_labels: int,
        ignore_index: int,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict[str, float | np.ndarray]:
        if len(predictions) == 0:
            raise ValueError("mean IoU of no image is undefined")
        intersect = np.zeros(num_labels, np.int64)
        predicted = np.zeros(num_labels, np.int64)
        labelled = np.zeros(num_labels, np.int64)
        for prediction, reference in zip(predictions, references):
            prediction, reference = np.asarray(prediction, np.int64), np.asarray(reference, np.int64).copy()
            if label_map:
                original = reference.copy()
                for old, new in label_map.items():
                    reference[original == old] = new
            if reduce_labels:
                zero = reference == 0
                reference = reference - 1
                reference[zero | (reference == ignore_index - 1)] = ignore_index
            a, b, c = _areas(prediction, reference, num_labels, ignore_index)
            intersect += a
            predicted += b
            labelled += c
        union = predicted + labelled - intersect
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersect / np.where(union > 0, union, np.nan)
            accuracy = intersect / np.where(labelled > 0, labelled, np.nan)
        results: dict[str, float | np.ndarray] = {
            "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
            "overall_accuracy": float(intersect.sum() / labelled.sum()) if labelled.sum() else float("nan"),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
        if nan_to_num is not None:
            results = {
                key: np.nan_to_num(value, nan=nan_to_num) if isinstance(value, np.ndarray) else value
                for key, value in results.items()
            }
        return results
