"""Object detection: the encoder's backbone class under a small anchor-free, CenterNet-style head, fine-tuned with
the `Trainer` and scored by COCO mAP (`simmim_hf/metrics/coco_map.py`, checked against pycocotools).

Why not `DetrForObjectDetection` / `ConditionalDetrForObjectDetection` (both take a `backbone_config` with
`use_timm_backbone=False`): their set-prediction loss (Hungarian matching of 100 queries, 6+6 transformer layers)
needs hundreds of epochs before boxes appear, which no CPU-sized evaluation can afford; at the sizes this tool runs
(thousands of 64 px images, minutes) they score an mAP of about zero for any encoder, so they cannot tell a
pretrained encoder from a random one. The head here learns in a few epochs: the backbone's feature maps are
projected to `hidden_size` channels and summed at the finest map's resolution (stride s); per cell it predicts a
heat-map logit per class (focal loss against Gaussians at box centres, as in CenterNet) and the distances
`(left, top, right, bottom)` from the cell to the box edges in units of s (L1 at the centre cells). Decoding keeps
the 3x3 local maxima of the heat map (CenterNet's NMS) and their boxes, 100 per image at most.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from simmim_hf.data.images import decode_image
from simmim_hf.eval.dense import load_dense_backbone, multiscale_settings
from simmim_hf.eval.dense_data import DenseData
from simmim_hf.eval.finetune import fine_tuning_arguments, processor_size
from simmim_hf.metrics.coco_map import MAX_DETECTIONS, coco_map


class CenterDetector(nn.Module):
    """Backbone + fused neck + heat-map and box heads. `forward(pixel_values (B, C, H, W), heatmaps=None,
    distances=None, centres=None)` returns `{"heatmap": (B, K, h, w), "distances": (B, 4, h, w)}` and, given the
    targets, `"loss"`."""

    def __init__(self, backbone: nn.Module, num_labels: int, hidden_size: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.project = nn.ModuleList(nn.Conv2d(c, hidden_size, 1) for c in backbone.channels)
        self.heatmap_head = nn.Sequential(
            nn.Conv2d(hidden_size, hidden_size, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden_size, num_labels, 1)
        )
        self.box_head = nn.Sequential(
            nn.Conv2d(hidden_size, hidden_size, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden_size, 4, 1)
        )
        nn.init.constant_(self.heatmap_head[-1].bias, -math.log((1 - 0.01) / 0.01))  # CenterNet's prior of 0.01

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        maps = self.backbone(pixel_values).feature_maps
        size = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        return sum(
            F.interpolate(p(m), size=size, mode="bilinear", align_corners=False) for p, m in zip(self.project, maps)
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        heatmaps: torch.Tensor | None = None,
        distances: torch.Tensor | None = None,
        centres: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        fused = self.features(pixel_values)
        out = {"heatmap": self.heatmap_head(fused), "distances": F.softplus(self.box_head(fused))}
        if heatmaps is not None:
            heat = (
                F.interpolate(heatmaps, size=fused.shape[-2:], mode="nearest")
                if heatmaps.shape[-2:] != fused.shape[-2:]
                else heatmaps
            )
            out["loss"] = focal_loss(out["heatmap"], heat) + box_loss(out["distances"], distances, centres)
        return out


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss. logits, target: `(B, K, h, w)`; target 1 at centres."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    positive = target.eq(1).float()
    pos = -(torch.log(p) * (1 - p) ** 2 * positive).sum()
    neg = -(torch.log(1 - p) * p**2 * (1 - target) ** 4 * (1 - positive)).sum()
    return (pos + neg) / positive.sum().clamp(min=1)


def box_loss(predicted: torch.Tensor, target: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """L1 of `(l, t, r, b)` distances `(B, 4, h, w)` at the centre cells `centres` `(B, h, w)` (bool)."""
    mask = centres[:, None].float()
    return (torch.abs(predicted - target) * mask).sum() / (4 * mask.sum()).clamp(min=1)


def detection_targets(
    boxes: np.ndarray, labels: np.ndarray, num_labels: int, grid: tuple[int, int], stride: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets on a `grid` `(h, w)` of cells `stride` `(sy, sx)` px apart, for `boxes` `(G, 4)` `[x, y, w, h]` in px:
    heat maps `(K, h, w)`, distances `(4, h, w)` in cells and the centre cells `(h, w)` bool."""
    h, w = grid
    heat = torch.zeros(num_labels, h, w)
    distances = torch.zeros(4, h, w)
    centres = torch.zeros(h, w, dtype=torch.bool)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for (x, y, bw, bh), label in sorted(zip(boxes.tolist(), labels.tolist()), key=lambda b: -b[0][2] * b[0][3]):
        cx, cy = (x + bw / 2) / stride[1] - 0.5, (y + bh / 2) / stride[0] - 0.5  # in cell coordinates
        sigma = max(0.5, min(bw / stride[1], bh / stride[0]) / 6)
        heat[label] = torch.maximum(heat[label], torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2)))
        i, j = min(h - 1, max(0, round(cy))), min(w - 1, max(0, round(cx)))
        heat[label, i, j] = 1.0
        centre_x, centre_y = (j + 0.5) * stride[1], (i + 0.5) * stride[0]
        distances[:, i, j] = torch.tensor(
            [
                (centre_x - x) / stride[1],
                (centre_y - y) / stride[0],
                (x + bw - centre_x) / stride[1],
                (y + bh - centre_y) / stride[0],
            ]
        )
        centres[i, j] = True
    return heat, distances, centres


def decode_detections(
    heatmap: torch.Tensor, distances: torch.Tensor, stride: tuple[float, float], top_k: int = MAX_DETECTIONS
) -> dict[str, np.ndarray]:
    """Boxes `[x, y, w, h]` (px of the input), scores and labels of one image from its heat map `(K, h, w)` (logits)
    and distances `(4, h, w)`: the 3x3 local maxima, best `top_k`."""
    scores = heatmap.sigmoid()
    peaks = scores * (F.max_pool2d(scores[None], 3, stride=1, padding=1)[0] == scores)
    k, h, w = scores.shape
    values, flat = peaks.flatten().topk(min(top_k, peaks.numel()))
    labels, cell = flat // (h * w), flat % (h * w)
    i, j = cell // w, cell % w
    d = distances[:, i, j]
    cx, cy = (j.float() + 0.5) * stride[1], (i.float() + 0.5) * stride[0]
    left, top = cx - d[0] * stride[1], cy - d[1] * stride[0]
    right, bottom = cx + d[2] * stride[1], cy + d[3] * stride[0]
    boxes = torch.stack([left, top, right - left, bottom - top], dim=1)
    return {"boxes": boxes.numpy(), "scores": values.numpy(), "labels": labels.numpy()}


class DetectionRows(torch.utils.data.Dataset):
    """Rows `{"pixel_values": (C, H, W), "heatmaps", "distances", "centres"}` at the processor's size, with the
    boxes scaled to it; `"reference"` keeps the boxes in the image's own pixels and the scale back to them."""

    def __init__(self, data: Any, image_column: str, objects_column: str, processor: Any, num_channels: int,
                 num_labels: int, grid: tuple[int, int], train: bool) -> None:  # fmt: skip
        self.data, self.image_column, self.objects_column = data, image_column, objects_column
        self.size, self.num_channels, self.num_labels, self.grid, self.train = (
            processor_size(processor), num_channels, num_labels, grid, train,
        )  # fmt: skip
        self.stride = (self.size[0] / grid[0], self.size[1] / grid[1])
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.data[int(index)]
        height, width = self.size
        image = decode_image(row[self.image_column], num_channels=self.num_channels)
        scale = (width / image.size[0], height / image.size[1])
        image = image.resize((width, height), 2)
        pixels = torch.from_numpy(np.asarray(image, np.float32).reshape(height, width, -1)).permute(2, 0, 1) / 255
        pixels = (pixels - self.mean) / self.std
        objects = row[self.objects_column]
        original = np.asarray(objects["bbox"], np.float64).reshape(-1, 4)
        labels = np.asarray(objects["category"], np.int64)
        boxes = original * np.array([scale[0], scale[1], scale[0], scale[1]])
        if self.train and torch.rand(()) < 0.5:
            pixels = pixels.flip(-1)
            boxes[:, 0] = width - boxes[:, 0] - boxes[:, 2]
        heat, distances, centres = detection_targets(boxes, labels, self.num_labels, self.grid, self.stride)
        out = {"pixel_values": pixels, "heatmaps": heat, "distances": distances, "centres": centres}
        if not self.train:
            out["reference"] = {"boxes": original, "labels": labels, "scale": scale}
        return out


def _stack(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([r[key] for r in rows]) for key in ("pixel_values", "heatmaps", "distances", "centres")}


def build_detector(
    encoder_path: str, num_labels: int, random_init: bool = False, hidden_size: int = 128, seed: int = 0
) -> CenterDetector:
    """`CenterDetector` over the encoder's backbone class, with the encoder's weights (or fresh ones from `seed`)."""
    from transformers import AutoBackbone, AutoConfig

    settings = multiscale_settings(AutoConfig.from_pretrained(encoder_path))
    torch.manual_seed(seed)
    if random_init:
        backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(encoder_path, **settings))
    else:
        backbone = load_dense_backbone(encoder_path, **settings)
    return CenterDetector(backbone, num_labels, hidden_size)


class _DetectionTrainer:
    """Builds a `Trainer` whose loss is the detector's own (`outputs["loss"]`)."""

    @staticmethod
    def make(model: nn.Module, arguments: Any, rows: DetectionRows) -> Any:
        from transformers import Trainer

        class DetectionTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # noqa: ANN001, ANN202
                outputs = model(**inputs)
                return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

        return DetectionTrainer(model=model, args=arguments, train_dataset=rows, data_collator=_stack)


def finetune_detector(
    encoder_path: str,
    data: DenseData,
    output_dir: str | os.PathLike,
    random_init: bool = False,
    image_processor: str | None = None,
    hidden_size: int = 128,
    epochs: int = 10,
    batch_size: int = 16,
    eval_batch_size: int = 64,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_ratio: float = 0.1,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Fine-tunes the detector on `data.train`; returns `coco_map` on `data.eval` (boxes in the images' pixels)."""
    from transformers import AutoImageProcessor

    device = device or torch.device("cpu")
    processor = AutoImageProcessor.from_pretrained(image_processor or encoder_path)
    model = build_detector(encoder_path, data.num_labels, random_init, hidden_size, seed)
    channels = int(getattr(model.backbone.config, "num_channels", 3))
    height, width = processor_size(processor)
    with torch.no_grad():
        grid = tuple(model.features(torch.zeros(1, channels, height, width)).shape[-2:])
    common = dict(image_column=data.image_column, objects_column=data.target_column, processor=processor,
                  num_channels=channels, num_labels=data.num_labels, grid=grid)  # fmt: skip
    train_rows = DetectionRows(data.train, train=True, **common)
    steps = epochs * -(-len(train_rows) // batch_size)
    arguments = fine_tuning_arguments(
        output_dir, epochs, steps, batch_size, learning_rate, weight_decay, warmup_ratio, seed, num_workers,
        device.type == "cpu",
    )  # fmt: skip
    _DetectionTrainer.make(model, arguments, train_rows).train()
    eval_rows = DetectionRows(data.eval, train=False, **common)
    predictions, references = [], []
    model.eval().to(device)
    with torch.no_grad():
        for start in range(0, len(eval_rows), eval_batch_size):
            batch = [eval_rows[i] for i in range(start, min(start + eval_batch_size, len(eval_rows)))]
            out = model(torch.stack([r["pixel_values"] for r in batch]).to(device))
            for row, heat, dist in zip(batch, out["heatmap"].cpu(), out["distances"].cpu()):
                found = decode_detections(heat, dist, eval_rows.stride)
                sx, sy = row["reference"]["scale"]
                found["boxes"] = found["boxes"] / np.array([sx, sy, sx, sy])
                predictions.append(found)
                references.append({"boxes": row["reference"]["boxes"], "labels": row["reference"]["labels"]})
    return coco_map(predictions, references, num_labels=data.num_labels)
