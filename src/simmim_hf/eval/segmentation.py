"""Semantic segmentation: the encoder as the backbone of a stock `UperNetForSemanticSegmentation`, fine-tuned with
the `Trainer` and scored by mean IoU (`simmim_hf/metrics/mean_iou.py`, loaded by path).

The encoder's exported image processor gives the input size and normalisation: images are resized (bilinear) to it
and masks (nearest) to it for training, with a random horizontal flip of both. Predictions are the argmax of the
logits upsampled (bilinear) to each reference mask's own size, so the score is at the data's resolution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from simmim_hf.data.images import decode_image
from simmim_hf.eval.dense import load_dense_backbone, multiscale_settings
from simmim_hf.eval.dense_data import DenseData, mask_array
from simmim_hf.eval.finetune import fine_tuning_arguments, processor_size

METRIC_PATH = Path(__file__).parent.parent / "metrics" / "mean_iou.py"


def load_mean_iou_metric() -> Any:
    """The project's `evaluate` mean-IoU metric, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


def build_segmenter(
    encoder_path: str,
    class_names: list[str],
    random_init: bool = False,
    hidden_size: int = 128,
    seed: int = 0,
) -> torch.nn.Module:
    """`UperNetForSemanticSegmentation` over the encoder's backbone class (`multiscale_settings` picks the scales).

    The backbone carries the encoder's weights (or, with `random_init`, fresh ones from `seed`); the UperNet head
    (pyramid pooling + FPN of width `hidden_size`, no auxiliary head) is drawn from `seed`.
    """
    from transformers import AutoConfig, UperNetConfig, UperNetForSemanticSegmentation

    settings = multiscale_settings(AutoConfig.from_pretrained(encoder_path))
    backbone_config = AutoConfig.from_pretrained(encoder_path, **settings)
    config = UperNetConfig(
        backbone_config=backbone_config,
        hidden_size=hidden_size,
        auxiliary_channels=hidden_size,
        use_auxiliary_head=False,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: i for i, name in enumerate(class_names)},
    )
    torch.manual_seed(seed)
    model = UperNetForSemanticSegmentation(config)
    if not random_init:
        backbone = load_dense_backbone(encoder_path, **settings)
        model.backbone.load_state_dict(backbone.state_dict())  # strict: every weight of the encoder's backbone
    return model


def remap_mask(mask: np.ndarray, ignore_index: int, reduce_labels: bool) -> np.ndarray:
    """`reduce_labels`: 0 (ADE20K's "other") becomes `ignore_index`, every other id decreases by one."""
    if not reduce_labels:
        return mask
    out = mask - 1
    out[(mask == 0) | (mask == ignore_index)] = ignore_index
    return out


class SegmentationRows(torch.utils.data.Dataset):
    """Rows `{"pixel_values": (C, H, W) float, "labels": (H, W) long}` at the processor's size (train: flipped at
    random); with `keep_reference`, also the mask at its own size under `"reference"`."""

    def __init__(
        self,
        data: Any,
        image_column: str,
        mask_column: str,
        processor: Any,
        num_channels: int,
        ignore_index: int,
        reduce_labels: bool,
        train: bool,
    ) -> None:
        self.data, self.image_column, self.mask_column = data, image_column, mask_column
        self.size = processor_size(processor)
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(processor.image_std, dtype=torch.float32)[:, None, None]
        self.num_channels, self.ignore_index, self.reduce_labels, self.train = (
            num_channels,
            ignore_index,
            reduce_labels,
            train,
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.data[int(index)]
        height, width = self.size
        image = decode_image(row[self.image_column], num_channels=self.num_channels).resize((width, height), 2)
        pixels = torch.from_numpy(np.asarray(image, np.float32).reshape(height, width, -1)).permute(2, 0, 1) / 255
        pixels = (pixels - self.mean) / self.std
        reference = remap_mask(mask_array(row[self.mask_column]), self.ignore_index, self.reduce_labels)
        labels = F.interpolate(torch.from_numpy(reference)[None, None].double(), size=self.size, mode="nearest")
        labels = labels[0, 0].long()
        if self.train and torch.rand(()) < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        out = {"pixel_values": pixels, "labels": labels}
        if not self.train:
            out["reference"] = reference
        return out


def _stack(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([r["pixel_values"] for r in rows]),
        "labels": torch.stack([r["labels"] for r in rows]),
    }


@torch.no_grad()
def predict_masks(
    model: torch.nn.Module, rows: SegmentationRows, batch_size: int, device: torch.device
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Predicted label maps, each at its reference's size `(H_i, W_i)`, and the references themselves."""
    model.eval().to(device)
    predictions, references = [], []
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        logits = model(pixel_values=torch.stack([r["pixel_values"] for r in batch]).to(device)).logits
        for row, logit in zip(batch, logits):
            size = row["reference"].shape
            upsampled = F.interpolate(logit[None].float(), size=size, mode="bilinear", align_corners=False)
            predictions.append(upsampled[0].argmax(0).cpu().numpy())
            references.append(row["reference"])
    return predictions, references


def finetune_segmenter(
    encoder_path: str,
    data: DenseData,
    output_dir: str | os.PathLike,
    random_init: bool = False,
    image_processor: str | None = None,
    hidden_size: int = 128,
    ignore_index: int = 255,
    reduce_labels: bool = False,
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
    """Fine-tunes UperNet on `data.train` and returns the mean-IoU metric's output on `data.eval`."""
    from transformers import AutoImageProcessor, Trainer

    device = device or torch.device("cpu")
    processor = AutoImageProcessor.from_pretrained(image_processor or encoder_path)
    model = build_segmenter(encoder_path, data.class_names, random_init, hidden_size, seed)
    model.config.loss_ignore_index = ignore_index
    channels = int(getattr(model.config.backbone_config, "num_channels", 3))
    common = dict(
        image_column=data.image_column,
        mask_column=data.target_column,
        processor=processor,
        num_channels=channels,
        ignore_index=ignore_index,
        reduce_labels=reduce_labels,
    )
    train_rows = SegmentationRows(data.train, train=True, **common)
    steps = epochs * -(-len(train_rows) // batch_size)
    arguments = fine_tuning_arguments(
        output_dir, epochs, steps, batch_size, learning_rate, weight_decay, warmup_ratio, seed, num_workers,
        device.type == "cpu",
    )  # fmt: skip
    Trainer(model=model, args=arguments, train_dataset=train_rows, data_collator=_stack).train()
    predictions, references = predict_masks(
        model, SegmentationRows(data.eval, train=False, **common), eval_batch_size, device
    )
    return load_mean_iou_metric().compute(
        predictions=predictions, references=references, num_labels=data.num_labels, ignore_index=ignore_index
    )
