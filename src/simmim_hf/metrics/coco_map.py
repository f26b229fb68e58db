"""COCO-style box mAP: mAP@[.5:.95] and mAP@.5 over all areas, at most 100 detections per image and class.

    coco_map(predictions, references)   # -> {"map": .., "map_50": .., "per_category_ap": (C,)}

`predictions[i]`: `{"boxes": (K, 4) [x, y, w, h], "scores": (K,), "labels": (K,)}` of image i; `references[i]`:
`{"boxes": (G, 4) [x, y, w, h], "labels": (G,)}`. Follows the rules of pycocotools' `COCOeval` (checked against it in
`tests/test_dense.py`): per image and class, detections in descending score, each matched greedily to the unmatched
ground-truth box of highest IoU at or above the threshold; precision made monotone and read at 101 recall points;
a class without ground truth is left out of the mean. Needs only numpy (no crowd boxes, no area ranges).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAX_DETECTIONS = 100


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU `(K, G)` of boxes `a` `(K, 4)` and `b` `(G, 4)`, both `[x, y, w, h]`."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 0] + a[:, None, 2], b[None, :, 0] + b[None, :, 2])
    bottom = np.minimum(a[:, None, 1] + a[:, None, 3], b[None, :, 1] + b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = (a[:, 2] * a[:, 3])[:, None] + (b[:, 2] * b[:, 3])[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _match(iou: np.ndarray, threshold: float) -> np.ndarray:
    """Which detections (rows, in descending score) are true positives at `threshold`: `(K,)` bool."""
    taken = np.zeros(iou.shape[1], bool)
    hits = np.zeros(iou.shape[0], bool)
    for d in range(iou.shape[0]):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(iou.shape[1]):
            if not taken[g] and iou[d, g] >= best_iou:
                best, best_iou = g, iou[d, g]
        if best >= 0:
            taken[best], hits[d] = True, True
    return hits


def _average_precision(scores: np.ndarray, hits: np.ndarray, num_truth: int) -> float:
    """101-point interpolated AP of detections with `scores` `(K,)` and true-positive flags `hits` `(K,)`."""
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(hits[order])
    fp = np.cumsum(~hits[order])
    recall = tp / num_truth
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    found = np.searchsorted(recall, RECALL_POINTS, side="left")
    points = np.zeros(len(RECALL_POINTS))
    valid = found < len(precision)
    points[valid] = precision[found[valid]]
    return float(points.mean())


def coco_map(
    predictions: Sequence[dict[str, Any]], references: Sequence[dict[str, Any]], num_labels: int | None = None
) -> dict[str, Any]:
    """`map` (mean over IoU 0.50:0.95), `map_50` and `per_category_ap` `(C,)` (NaN for a class without ground truth)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    labels_seen = [np.asarray(r["labels"], np.int64) for r in references] + [
        np.asarray(p["labels"], np.int64) for p in predictions
    ]
    if num_labels is None:
        num_labels = 1 + max((int(x.max()) for x in labels_seen if x.size), default=-1)
    ap = np.full((len(IOU_THRESHOLDS), num_labels), np.nan)
    for c in range(num_labels):
        scores, hits, num_truth = [], [[] for _ in IOU_THRESHOLDS], 0
        for prediction, reference in zip(predictions, references):
            truth = np.asarray(reference["boxes"], np.float64).reshape(-1, 4)[np.asarray(reference["labels"]) == c]
            keep = np.asarray(prediction["labels"]) == c
            boxes = np.asarray(prediction["boxes"], np.float64).reshape(-1, 4)[keep]
            score = np.asarray(prediction["scores"], np.float64)[keep]
            order = np.argsort(-score, kind="mergesort")[:MAX_DETECTIONS]
            boxes, score = boxes[order], score[order]
            num_truth += len(truth)
            iou = box_iou(boxes, truth)
            scores.append(score)
            for t, threshold in enumerate(IOU_THRESHOLDS):
                hits[t].append(_match(iou, threshold))
        if num_truth == 0:
            continue
        all_scores = np.concatenate(scores) if scores else np.zeros(0)
        for t in range(len(IOU_THRESHOLDS)):
            all_hits = np.concatenate(hits[t]) if hits[t] else np.zeros(0, bool)
            ap[t, c] = _average_precision(all_scores, all_hits, num_truth)
    present = ~np.isnan(ap[0])
    return {
        "map": float(ap[:, present].mean()) if present.any() else float("nan"),
        "map_50": float(ap[0, present].mean()) if present.any() else float("nan"),
        "per_category_ap": ap.mean(axis=0),
    }
