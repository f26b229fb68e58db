"""End-to-end fine-tuning of an encoder as an `AutoModelForImageClassification` with the HF `Trainer`.

SimMIM recipe, scaled down: AdamW with layer-wise LR decay (0.65 ViT/BEiT, 0.9 Swin and ConvNets, per block), cosine
schedule with warmup, label smoothing 0.1, and the pretraining augmentation family (RandomResizedCrop + horizontal
flip) normalised with the image processor's mean/std. Evaluation images go through the image processor itself.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from simmim_hf.data.images import SimMIMAugmentation, decode_image
from simmim_hf.data.labelled import EvalData
from simmim_hf.eval.arguments import EvaluationArguments
from simmim_hf.eval.features import load_reporting_surprises, resolve_encoder_path
from simmim_hf.eval.layer_decay import param_groups_layer_decay
from simmim_hf.publish.convert import export_finetuning_layout


class LayerDecayTrainer(Trainer):
    """`Trainer` whose default AdamW uses `param_groups_layer_decay` groups (per-layer LR, selective weight decay)."""

    def __init__(self, *args: Any, layer_decay: float | None = None, **kwargs: Any) -> None:
        self.layer_decay = layer_decay
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            # Names come from the (possibly wrapped) model being optimised; the config from the plain model.
            opt_model = self.model if model is None else model
            groups = param_groups_layer_decay(
                self.model,
                base_lr=self.args.learning_rate,
                weight_decay=self.args.weight_decay,
                layer_decay=self.layer_decay,
                named_parameters=opt_model.named_parameters(),
            )
            self.optimizer = torch.optim.AdamW(
                groups,
                lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
            )
        return self.optimizer


def fine_tuning_arguments(
    output_dir: Any,
    epochs: int,
    steps: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    seed: int,
    num_workers: int,
    use_cpu: bool,
    **extra: Any,
) -> Any:
    """The `TrainingArguments` every fine-tuning protocol (classification, segmentation, detection) trains with:
    cosine LR after `ceil(steps x warmup_ratio)` warmup steps, seeded, ~10 log lines, no evaluation, saving or
    integrations during training; `extra` adds protocol-specific fields."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(steps * warmup_ratio),
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=num_workers,
        logging_steps=max(1, steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=use_cpu,
        **extra,
    )


def processor_size(processor: Any) -> tuple[int, int]:
    """`(height, width)` the processor resizes to (`{"height", "width"}`, `{"shortest_edge"}` or a crop size)."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None)
    if isinstance(size, int):
        return size, size
    size = dict(size or {})
    if "height" in size and "width" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return int(size["shortest_edge"]), int(size["shortest_edge"])
    raise ValueError(f"cannot read an image size from the processor's size {size!r}")


def train_transform(processor: Any, crop_min_scale: float = 0.67) -> SimMIMAugmentation:
    """The pretraining augmentation (`SimMIMAugmentation`: RandomResizedCrop + flip) at the processor's size,
    with crop scale `(crop_min_scale, 1)`, normalised with the processor's mean/std. PIL -> `(C, H, W)` float32."""
    mean, std = list(processor.image_mean), list(processor.image_std)
    return SimMIMAugmentation(processor_size(processor), len(mean), mean, std, scale=(crop_min_scale, 1.0))


class _ClassificationDataset(torch.utils.data.Dataset):
    """Rows of `{"pixel_values", "labels"}` (train: transformed tensors) or `{"image", "labels"}` (eval: PIL)."""

    def __init__(self, dataset: Any, image_column: str, labels: np.ndarray, num_channels: int, transform: Any) -> None:
        self.dataset, self.image_column, self.labels = dataset, image_column, labels
        self.num_channels, self.transform = num_channels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = decode_image(self.dataset[int(index)][self.image_column], num_channels=self.num_channels)
        if self.transform is None:
            return {"image": image, "labels": int(self.labels[index])}
        return {"pixel_values": self.transform(image), "labels": int(self.labels[index])}


class _Collator:
    """Stacks transformed training rows; runs the image processor on a whole batch of evaluation images."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([row["labels"] for row in rows], dtype=torch.long)
        if "image" in rows[0]:
            pixel_values = self.processor(images=[row["image"] for row in rows], return_tensors="pt")["pixel_values"]
        else:
            pixel_values = torch.stack([row["pixel_values"] for row in rows])
        return {"pixel_values": pixel_values, "labels": labels}


def build_classifier(
    model_name_or_path: str,
    class_names: list[str],
    random_init: bool = False,
    drop_path_rate: float | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """`AutoModelForImageClassification` with a fresh `len(class_names)`-way head (or fully fresh weights)."""
    from transformers import AutoConfig, AutoModelForImageClassification

    id2label = dict(enumerate(class_names))
    config = AutoConfig.from_pretrained(
        model_name_or_path,
        num_labels=len(class_names),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
    )
    if drop_path_rate is not None and hasattr(config, "drop_path_rate"):
        config.drop_path_rate = drop_path_rate
    torch.manual_seed(seed)  # the new head (and, for random_init, everything) is drawn from this seed
    if random_init:
        return AutoModelForImageClassification.from_config(config)
    # ignore_mismatched_sizes: a checkpoint that already is a classifier may have another number of classes.
    # The new head is missing from the checkpoint by design, and an exported encoder's pooler is not used by the
    # classifier: neither is worth a load report.
    return load_reporting_surprises(
        AutoModelForImageClassification.from_pretrained,
        model_name_or_path,
        expected_unexpected=("pooler.",),
        expected_missing=("classifier.",),
        config=config,
        ignore_mismatched_sizes=True,
    )


def finetune_classifier(
    model_name_or_path: str,
    data: EvalData,
    output_dir: str | os.PathLike,
    image_processor: str | None = None,
    random_init: bool = False,
    epochs: int = 10,
    batch_size: int = 64,
    eval_batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    label_smoothing: float = 0.1,
    warmup_ratio: float = 0.1,
    crop_min_scale: float = 0.67,
    drop_path_rate: float | None = 0.1,
    seed: int = 0,
    num_workers: int = 0,
    use_cpu: bool = False,
    save_model: bool = False,
) -> np.ndarray:
    """Fine-tunes on `data.train` and returns logits `(M, num_classes)` on `data.eval`.

    `model_name_or_path` is a stock encoder folder/Hub id; its `AutoImageProcessor` (or `image_processor`) gives
    the input size and normalisation. With `save_model`, the classifier and processor are saved in `output_dir`.
    """
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(image_processor or model_name_or_path)
    model = build_classifier(model_name_or_path, data.class_names, random_init, drop_path_rate, seed)
    channels = int(getattr(model.config, "num_channels", 3))
    train_set = _ClassificationDataset(
        data.train, data.image_column, data.train_labels, channels, train_transform(processor, crop_min_scale)
    )
    eval_set = _ClassificationDataset(data.eval, data.image_column, data.eval_labels, channels, None)
    steps = epochs * -(-len(train_set) // batch_size)
    training_args = fine_tuning_arguments(
        output_dir, epochs, steps, batch_size, learning_rate, weight_decay, warmup_ratio, seed, num_workers, use_cpu,
        per_device_eval_batch_size=eval_batch_size,
        label_smoothing_factor=label_smoothing,
    )  # fmt: skip
    trainer = LayerDecayTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        data_collator=_Collator(processor),
        layer_decay=layer_decay,
    )
    trainer.train()
    logits = trainer.predict(eval_set).predictions
    if save_model:
        trainer.save_model(str(output_dir))
        processor.save_pretrained(str(output_dir))
    return np.asarray(logits[0] if isinstance(logits, tuple) else logits, dtype=np.float32)


def finetuning_encoder_path(model: str, workdir: str | os.PathLike, layout: str = "official") -> str:
    """The encoder to fine-tune for `model`: with `layout="official"`, a BEiT encoder in the pretraining layout
    (shared relative position table or CLS pooling) is rewritten into microsoft/SimMIM's fine-tuning layout
    (`simmim_hf.publish.convert.finetuning_encoder`: mean pooling, per-block tables copied from the shared one) under
    `workdir`; any other encoder, or `layout="as-is"`, is used as exported."""
    from transformers import AutoConfig

    path = resolve_encoder_path(model, workdir)
    if layout != "official":
        return path
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "beit" or (config.use_mean_pooling and not config.use_shared_relative_position_bias):
        return path
    return str(export_finetuning_layout(path, os.path.join(workdir, "encoder-finetuning-layout")))


def finetune_from_args(args: EvaluationArguments, data: EvalData, workdir: str | os.PathLike) -> np.ndarray:
    """`finetune_classifier` driven by the evaluation CLI arguments. Returns eval logits `(M, num_classes)`."""
    path = finetuning_encoder_path(args.model, workdir, getattr(args, "finetune_layout", "official"))
    return finetune_classifier(
        path,
        data,
        output_dir=args.finetune_output_dir or os.path.join(workdir, "finetune"),
        image_processor=args.image_processor,
        random_init=args.random_init,
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        label_smoothing=args.label_smoothing,
        warmup_ratio=args.warmup_ratio,
        crop_min_scale=args.crop_min_scale,
        drop_path_rate=args.drop_path_rate,
        seed=args.seed,
        num_workers=args.num_workers,
        use_cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()),
        save_model=args.finetune_output_dir is not None,
    )
