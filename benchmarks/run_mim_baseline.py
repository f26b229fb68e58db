#!/usr/bin/env python
"""The end-to-end baseline of `scripts/benchmark.py --e2e`: SimMIM pretraining the way transformers' example
`examples/pytorch/image-pretraining/run_mim.py` does it (written here from its approach, not copied):

* a map-style `load_dataset` of the same shards (here the local `webdataset` builder, the whole split in memory-mapped
  Arrow), images decoded by `datasets` on access;
* `set_transform` with torchvision (v1) transforms: RGB convert, RandomResizedCrop, horizontal flip, ToTensor,
  Normalize, and a numpy mask generator drawing one mask per example;
* the stock `Trainer` (random sampler, default collate of stacked tensors) and `ViTForMaskedImageModeling` with the
  model settings of our preset (`--preset`, default `demo`), the same optimiser settings and schedule.

    python benchmarks/run_mim_baseline.py --data_files '/tmp/data/*.tar' --output_dir /tmp/base --max_steps 300

Prints the Trainer's final metrics line (`train_samples_per_second`, ...) like any Trainer run.
"""

from __future__ import annotations

import argparse
import glob
import math

import numpy as np
import torch
from torchvision import transforms as T
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForMaskedImageModeling

from simmim_hf import SimMIMConfig
from simmim_hf.data.images import CROP_RATIO, CROP_SCALE


class NumpyMaskGenerator:
    """One SimMIM mask per call, drawn with numpy's global RNG (as the example does): `(num_patches,)` int, 1 = masked."""

    def __init__(self, input_size: int, mask_patch_size: int, model_patch_size: int, mask_ratio: float) -> None:
        self.cells_per_side = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.num_cells = self.cells_per_side**2
        self.num_masked = int(math.ceil(self.num_cells * mask_ratio))

    def __call__(self) -> np.ndarray:
        chosen = np.random.permutation(self.num_cells)[: self.num_masked]
        cells = np.zeros(self.num_cells, dtype=int)
        cells[chosen] = 1
        grid = cells.reshape(self.cells_per_side, self.cells_per_side)
        return grid.repeat(self.scale, axis=0).repeat(self.scale, axis=1).flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_files", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=1)
    parser.add_argument("--base_learning_rate", type=float, default=0.008)
    parser.add_argument("--warmup_steps", type=int, default=50)
    parser.add_argument("--logging_steps", type=int, default=20)
    parser.add_argument("--save_steps", type=int, default=200)
    parser.add_argument("--config_overrides", default="", help="Encoder overrides, e.g. hidden_size=32 (tests).")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import datasets

    overrides = dict(item.split("=") for item in args.config_overrides.split(",") if item)
    ours = SimMIMConfig.from_preset(args.preset, **{key: int(value) for key, value in overrides.items()})
    if ours.encoder_type != "vit":
        raise SystemExit("the run_mim.py baseline is written for ViT presets")
    config = ViTConfig(**{**ours.encoder_config.to_dict(), "encoder_stride": ours.model_patch_size})
    files = sorted(glob.glob(args.data_files))
    dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    image_column = next(name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image))

    size = ours.image_size
    transform = T.Compose(
        [
            T.Lambda(lambda image: image.convert("RGB") if image.mode != "RGB" else image),
            T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean=ours.image_mean, std=ours.image_std),
        ]
    )
    masks = NumpyMaskGenerator(size, ours.mask_patch_size, ours.model_patch_size, ours.mask_ratio)

    def preprocess(examples: dict) -> dict:
        examples["pixel_values"] = [transform(image) for image in examples[image_column]]
        examples["mask"] = [masks() for _ in range(len(examples[image_column]))]
        return examples

    dataset.set_transform(preprocess)

    def collate(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "bool_masked_pos": torch.tensor(np.stack([example["mask"] for example in examples])),
        }

    learning_rate = args.base_learning_rate * args.batch_size / 512
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        weight_decay=0.05,
        adam_beta2=0.999,
        max_grad_norm=5.0,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=2,
        dataloader_num_workers=args.num_workers,
        remove_unused_columns=False,
        report_to="none",
        seed=args.seed,
    )
    model = ViTForMaskedImageModeling(config)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    trainer.save_model()


if __name__ == "__main__":
    main()
