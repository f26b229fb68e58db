"""Frozen-feature extraction: loading an encoder (any `AutoModel`, a SimMIM checkpoint or raw pixels) with its
image processor, and mean-pooling its patch tokens (a ConvNet: its last feature map) into one vector per image.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from simmim_hf.backbones import num_prefix_tokens
from simmim_hf.data.images import build_image_processor, decode_image
from simmim_hf.embedding import pool_tokens
from simmim_hf.eval.arguments import PIXELS
from simmim_hf.modeling_simmim import HeldLoadReports, SimMIMForMaskedImageModeling
from simmim_hf.publish.convert import export_encoder
from simmim_hf.publish.run_dir import RunDir

logger = logging.getLogger(__name__)


@dataclass
class Encoder:
    """A feature extractor: a transformers model (or `None` for raw pixels) and its image processor."""

    model: nn.Module | None
    processor: Any
    num_channels: int
    path: str


def resolve_encoder_path(model_name_or_path: str, workdir: str | os.PathLike) -> str:
    """Returns a stock-encoder folder/id for `model_name_or_path`.

    A full SimMIM checkpoint (`model_type == "simmim"`) is turned into its encoder: `<dir>/encoder` when the
    pretraining run left one, otherwise `simmim_hf.export_encoder` into `workdir`.
    """
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    if config_dict.get("model_type") != "simmim":
        return model_name_or_path
    exported = RunDir(model_name_or_path).encoder
    if (exported / "config.json").is_file():
        return str(exported)
    model = SimMIMForMaskedImageModeling.from_pretrained(model_name_or_path)
    return str(export_encoder(model, RunDir(workdir).encoder))


def pixel_processor(image_size: int, num_channels: int = 1) -> Any:
    """Processor for raw-pixel features: resize to `image_size` (bilinear) and scale to [-1, 1]."""
    return build_image_processor(image_size, [0.5] * num_channels, [0.5] * num_channels, resample=2)


def load_encoder(
    model_name_or_path: str,
    random_init: bool = False,
    image_processor: str | None = None,
    pixel_size: int | None = None,
    pixel_channels: int = 1,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> Encoder:
    """Loads `AutoModel` + `AutoImageProcessor` (or a raw-pixel "encoder" when `model_name_or_path == "pixels"`)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if model_name_or_path == PIXELS:
        if image_processor is not None:
            processor = AutoImageProcessor.from_pretrained(image_processor)
        else:
            processor = pixel_processor(pixel_size or 32, num_channels=pixel_channels)
        return Encoder(None, processor, len(getattr(processor, "image_mean", [0.5])), PIXELS)
    path = resolve_encoder_path(model_name_or_path, workdir or tempfile.mkdtemp(prefix="simmim_eval_"))
    if random_init:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(seed)
        build, source = AutoModel.from_config, config
    else:
        build, source = AutoModel.from_pretrained, path
    if random_init:
        try:  # the pooler is never used here
            model = build(source, add_pooling_layer=False)
        except TypeError:  # architectures without a pooler option
            model = build(source)
    else:
        try:
            model = load_reporting_surprises(build, source, expected_unexpected=("pooler.",), add_pooling_layer=False)
        except TypeError:
            model = load_reporting_surprises(build, source)
    try:
        processor = AutoImageProcessor.from_pretrained(image_processor or path)
    except OSError as error:
        raise ValueError(
            f"no image processor found for {image_processor or path!r} (preprocessor_config.json); "
            "pass --image_processor with a folder or Hub id that has one"
        ) from error
    return Encoder(model.eval(), processor, int(getattr(model.config, "num_channels", 3)), path)


def load_reporting_surprises(
    from_pretrained: Callable[..., Any],
    source: str,
    expected_unexpected: tuple[str, ...] = (),
    expected_missing: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """`from_pretrained(source, **kwargs)` without transformers' LOAD REPORT for what the caller expects.

    The pooler of an exported encoder is unused by feature extraction and by classification heads (they pool
    themselves), and a classifier's head is new by design: the report would point at them although nothing is wrong.
    Keys matching `expected_unexpected` / `expected_missing` (name prefixes) are left out; anything else is logged as
    one warning.
    """
    with HeldLoadReports():  # dropped: what is unexpected is logged below
        model, info = from_pretrained(source, output_loading_info=True, **kwargs)
    surprises = {
        "unexpected": [k for k in info.get("unexpected_keys", []) if not k.startswith(expected_unexpected)],
        "missing": [k for k in info.get("missing_keys", []) if not k.startswith(expected_missing)],
        "mismatched": [str(k) for k in info.get("mismatched_keys", [])],
    }
    surprises = {kind: sorted(keys) for kind, keys in surprises.items() if keys}
    if surprises:
        logger.warning("Loading %s as %s: %s", source, type(model).__name__, surprises)
    return model


class _ImageCollator:
    """Turns a list of raw images into `pixel_values: (B, C, H, W)` with the processor, in the channel mode it needs."""

    def __init__(self, processor: Any, num_channels: int, image_column: str) -> None:
        self.processor, self.num_channels, self.image_column = processor, num_channels, image_column

    def __call__(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        images = [decode_image(row[self.image_column], num_channels=self.num_channels) for row in rows]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    dataset: Any,
    image_column: str,
    feature_layer: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> torch.Tensor:
    """Frozen features `(N, D)` float32 on the CPU, in dataset order.

    Models: mean of the patch tokens of `last_hidden_state` (or of `hidden_states[feature_layer]`), CLS and other
    prefix tokens excluded; ConvNets (ConvNeXt, ConvNeXt V2, ResNet): the global average of that feature map
    `(B, C, h, w)` (not the stock pooler, which ConvNeXt follows with a LayerNorm). Raw pixels: the flattened
    preprocessed image.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_ImageCollator(encoder.processor, encoder.num_channels, image_column),
    )
    model = encoder.model
    prefix = 0
    if model is not None:
        model.to(device).eval()
        prefix = num_prefix_tokens(model)
    chunks = []
    for pixel_values in tqdm(loader, desc=desc, leave=False):
        if model is None:
            chunks.append(pixel_values.flatten(1).float())
            continue
        outputs = model(pixel_values=pixel_values.to(device), output_hidden_states=feature_layer is not None)
        if feature_layer is None:
            hidden = outputs.last_hidden_state
        else:
            states = outputs.hidden_states
            if not -len(states) <= feature_layer < len(states):
                raise ValueError(f"feature_layer={feature_layer} out of range: the model returns {len(states)} states")
            hidden = states[feature_layer]
        chunks.append(pool_tokens(hidden, prefix).float().cpu())
    return torch.cat(chunks)
