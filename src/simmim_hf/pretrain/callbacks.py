"""Trainer callbacks of the pretraining job: the NaN/Inf step guard, the run's epoch, reconstruction pictures during
training."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from simmim_hf.feature_pictures import attention_picture, has_cls_attention, pca_picture
from simmim_hf.visualization import reconstruction_grid

logger = logging.getLogger(__name__)


class NonFiniteGuard(TrainerCallback):
    """Hands the optimizer step over to `SimMIMTrainer.skip_nonfinite_step` (after clipping, before the update)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # The run's total survives a resume through the logged counts.
        self.trainer.nonfinite_steps = max((entry.get("nonfinite_steps", 0) for entry in state.log_history), default=0)
        self.trainer.nonfinite_in_a_row = 0

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.skip_nonfinite_step()


class RunEpoch(TrainerCallback):
    """Sets the Trainer's `epoch` (logged with every loss, saved in `trainer_state.json`) to the passes over the data
    of the whole run (`StreamLoader.run_epoch`). With `max_steps` over a stream, the Trainer's own value is the
    fraction of `max_steps` done in this session, which restarts at every resume."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        state.epoch = round(self.loader.run_epoch(), 6)


class ReconstructionCallback(TrainerCallback):
    """Every `every_n_steps` (and at the end), renders original / masked / reconstructed images of a fixed batch
    with a fixed mask, and the feature pictures of the same images (`simmim_hf.feature_pictures`); writes
    `output_dir/reconstructions/step-N.png` and `output_dir/features/{pca,attention}-step-N.png`, and logs them to
    TensorBoard when the TensorBoard integration is active. Runs on the main process only.

    pixel_values: (N, C, H, W) normalised; bool_masked_pos: (N, num_patches), 1 = masked.
    """

    def __init__(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor, every_n_steps: int = 0) -> None:
        self.pixel_values = pixel_values
        self.bool_masked_pos = bool_masked_pos
        self.every_n_steps = every_n_steps
        self.tensorboard: TrainerCallback | None = None

    def attach(self, trainer: Trainer) -> ReconstructionCallback:
        """Finds the Trainer's TensorBoard callback (its writer is created when training starts)."""
        for callback in trainer.callback_handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback":
                self.tensorboard = callback
        return self

    @property
    def tb_writer(self) -> Any:
        return getattr(self.tensorboard, "tb_writer", None)

    def render(self, model: torch.nn.Module, output_dir: str, step: int, tb_writer: Any = None) -> Path:
        """Writes `reconstructions/step-N.png` and the feature pictures `features/pca-step-N.png` (and, for ViT/DeiT/
        BEiT, `features/attention-step-N.png`); returns the reconstruction's path."""
        image = reconstruction_grid(model, self.pixel_values, self.bool_masked_pos)
        path = Path(output_dir) / "reconstructions" / f"step-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        pictures = {"reconstruction": image}
        mean, std = model.config.image_mean, model.config.image_std
        pictures["features/pca"] = pca_picture(model, self.pixel_values, mean, std)
        if has_cls_attention(model):
            pictures["features/attention"] = attention_picture(model, self.pixel_values, mean, std)
        features = Path(output_dir) / "features"
        features.mkdir(parents=True, exist_ok=True)
        for tag, picture in pictures.items():
            if tag != "reconstruction":
                picture.save(features / f"{tag.split('/')[-1]}-step-{step}.png")
        if tb_writer is not None:
            for tag, picture in pictures.items():
                array = np.asarray(picture.convert("RGB"))
                tb_writer.add_image(tag, array, global_step=step, dataformats="HWC")
        return path

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if self.every_n_steps and state.global_step % self.every_n_steps == 0 and state.is_world_process_zero:
            self.render(model, args.output_dir, state.global_step, self.tb_writer)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: Any = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.render(model, args.output_dir, state.global_step, self.tb_writer)
