"""State-dict adapters between simmim_hf and transformers' own masked-image-modeling classes, and encoder export.

All conversions go through module objects (`load_state_dict` on identical stock submodules), never through
hand-written key tables, so they hold whatever names the installed transformers uses in memory; on disk, stock
classes write their own (legacy) layout through `save_pretrained`.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForMaskedImageModeling, PreTrainedModel, ViTImageProcessor

from simmim_hf.configuration_simmim import SimMIMConfig, default_mask_patch_size, rebuild_encoder_config, to_pair
from simmim_hf.data.images import build_image_processor
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling, SimMIMModel

# transformers' MIM classes keep their encoder under the model type's name (`vit`, `swin`, `swinv2`, `deit`).
_TRANSFORMERS_MIM_TYPES = ("vit", "deit", "swin", "swinv2")


def from_transformers(
    model: PreTrainedModel, mask_patch_size: int | None = None, mask_ratio: float = 0.6
) -> SimMIMForMaskedImageModeling:
    """`ViTForMaskedImageModeling` / `DeiTForMaskedImageModeling` / `SwinForMaskedImageModeling` /
    `Swinv2ForMaskedImageModeling` -> `SimMIMForMaskedImageModeling` with the same weights (same loss and
    reconstruction for the same input and mask)."""
    model_type = model.config.model_type
    if model_type not in _TRANSFORMERS_MIM_TYPES or not hasattr(model, "decoder"):
        raise ValueError(
            f"model: expected one of transformers' SimMIM models ({', '.join(_TRANSFORMERS_MIM_TYPES)}), got "
            f"{type(model).__name__}"
        )
    encoder_config = copy.deepcopy(model.config)
    config = SimMIMConfig(
        encoder_config=encoder_config,
        mask_patch_size=mask_patch_size or default_mask_patch_size(encoder_config),
        mask_ratio=mask_ratio,
    )
    if config.encoder_stride != model.config.encoder_stride:
        raise ValueError(
            f"encoder_stride: transformers model uses {model.config.encoder_stride}, SimMIM derives "
            f"{config.encoder_stride} from the encoder"
        )
    simmim = SimMIMForMaskedImageModeling(config)
    simmim.simmim.encoder.load_state_dict(getattr(model, model_type).state_dict())
    simmim.decoder.load_state_dict(model.decoder.state_dict())
    return simmim.to(dtype=next(model.parameters()).dtype)


def to_transformers(model: SimMIMForMaskedImageModeling) -> PreTrainedModel:
    """`SimMIMForMaskedImageModeling` -> transformers' own `*ForMaskedImageModeling` with the same weights."""
    encoder_config = copy.deepcopy(model.config.encoder_config)
    if encoder_config.model_type not in _TRANSFORMERS_MIM_TYPES:
        raise ValueError(
            f"model: transformers has no SimMIM class for a {encoder_config.model_type!r} encoder "
            f"(supported: {', '.join(_TRANSFORMERS_MIM_TYPES)}); use export_encoder for the encoder alone"
        )
    target = AutoModelForMaskedImageModeling.from_config(encoder_config)
    getattr(target, encoder_config.model_type).load_state_dict(model.simmim.encoder.state_dict())
    target.decoder.load_state_dict(model.decoder.state_dict())
    return target.to(dtype=next(model.parameters()).dtype)


def stock_encoder_config(config: SimMIMConfig) -> Any:
    """The encoder's config as a stock model wants it: no mask token, architectures set."""
    encoder_config = config.encoder_config
    model_class = AutoModel._model_mapping[type(encoder_config)]
    changes: dict[str, Any] = {"architectures": [model_class.__name__]}
    if encoder_config.model_type == "beit":
        changes["use_mask_token"] = False
    return rebuild_encoder_config(encoder_config, **changes)


def stock_encoder(model: SimMIMForMaskedImageModeling | SimMIMModel) -> PreTrainedModel:
    """The trained encoder as a stock transformers model (`ViTModel`, `SwinModel`, ...), pooler included.

    SimMIM does not train a pooler: ViT's `pooler.dense` keeps its initial weights (saved, so loads are clean and
    deterministic); use mean-pooled `last_hidden_state` as the image feature. Swin's pooler has no weights; BEiT's
    pooler is parameter-free with `use_mean_pooling=False` (the official recipe).
    """
    base = model.simmim if isinstance(model, SimMIMForMaskedImageModeling) else model
    encoder_config = stock_encoder_config(base.config)
    stock = AutoModel.from_config(encoder_config)
    state = {k: v for k, v in base.encoder.state_dict().items() if not k.endswith("mask_token")}
    missing, unexpected = stock.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "mask_token" not in k]
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise RuntimeError(f"encoder export mismatch: missing {missing}, unexpected {unexpected}")
    return stock.to(dtype=next(base.parameters()).dtype)


def resample_relative_position_table(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """A Swin relative position table for another window, as the official fine-tuning loader does it: the
    (2w - 1) x (2w - 1) grid of each head resized bicubically to (2w' - 1) x (2w' - 1).

    table: ((2w - 1)^2, heads). Returns ((2 new_window - 1)^2, heads).
    """
    rows, heads = table.shape
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"relative position table of {rows} rows is not a square grid")
    new_side = 2 * new_window - 1
    if new_side == side:
        return table.clone()
    grid = table.float().permute(1, 0).reshape(1, heads, side, side)
    grid = torch.nn.functional.interpolate(grid, size=(new_side, new_side), mode="bicubic")
    return grid.reshape(heads, new_side * new_side).permute(1, 0).contiguous().to(table.dtype)


def finetuning_encoder(
    encoder: PreTrainedModel, image_size: int | None = None, window_size: int | None = None
) -> PreTrainedModel:
    """A stock encoder in the layout the official SimMIM fine-tuning starts from.

    BEiT (the official ViT): mean pooling (`use_mean_pooling=True`: the final LayerNorm is dropped, a fresh pooler
    LayerNorm 1/0 takes its place, as the official `fc_norm`) and one relative position table per block, each a copy
    of the shared pretraining table (`use_relative_position_bias=True`, `use_shared_relative_position_bias=False`).
    A BEiT already in that layout is returned as a copy. `image_size`/`window_size` do not apply to BEiT.
    Swin: optionally another `image_size` and `window_size` (e.g. 224 / 7 from 192 / 6), each block's table resampled
    bicubically (`resample_relative_position_table`); index buffers and attention masks are recomputed by
    transformers. Other encoders are returned unchanged (a copy).
    """
    config = copy.deepcopy(encoder.config)
    model_type = config.model_type
    state = {k: v for k, v in encoder.state_dict().items() if "mask_token" not in k}
    if model_type == "beit":
        if image_size is not None or window_size is not None:
            raise ValueError("image_size/window_size: the BEiT fine-tuning layout keeps the pretraining grid")
        shared_key = next((k for k in state if k.startswith("shared_position_bias.")), None)
        config.use_mask_token = False
        if shared_key is not None:
            config.use_relative_position_bias = True
            config.use_shared_relative_position_bias = False
        config.use_mean_pooling = True
        target = AutoModel.from_config(config)
        new_state = {}
        for key in target.state_dict():
            if key in state:
                new_state[key] = state[key]
            elif key.endswith("relative_position_bias.relative_position_bias_table") and shared_key is not None:
                new_state[key] = state[shared_key].clone()
        missing, unexpected = target.load_state_dict(new_state, strict=False)
        leftover = [k for k in missing if not k.startswith("pooler.")]
        if leftover:
            raise RuntimeError(f"fine-tuning layout: no weights for {leftover}")
        return target.to(dtype=next(encoder.parameters()).dtype)
    if model_type == "swin" and (image_size is not None or window_size is not None):
        if image_size is not None:
            config.image_size = image_size
        if window_size is not None:
            config.window_size = window_size
        target = AutoModel.from_config(config)
        target_state = target.state_dict()
        new_state = {}
        for key, value in state.items():
            if key not in target_state:
                continue
            if key.endswith("relative_position_bias_table") and value.shape != target_state[key].shape:
                new_window = (math.isqrt(target_state[key].shape[0]) + 1) // 2
                value = resample_relative_position_table(value, new_window)
            if key.endswith("position_embeddings") and value.shape != target_state[key].shape:
                raise ValueError(f"{key}: resizing absolute position embeddings is not supported")
            new_state[key] = value
        missing, unexpected = target.load_state_dict(new_state, strict=False)
        leftover = [k for k in missing if not k.startswith("pooler.")]
        if leftover:
            raise RuntimeError(f"fine-tuning layout: no weights for {leftover}")
        return target.to(dtype=next(encoder.parameters()).dtype)
    if image_size is not None or window_size is not None:
        raise ValueError(f"image_size/window_size: resampling is implemented for Swin, not {model_type!r}")
    return copy.deepcopy(encoder)


def image_processor_for(config: SimMIMConfig, resample: int = 3) -> ViTImageProcessor:
    """The stock image processor matching pretraining: resize to `image_size`, rescale to [0, 1], normalise with the
    pretraining mean/std (`resample`: PIL code, 3 = bicubic). `ViTImageProcessor` is the stock processor of ViT and
    Swin, and serves BEiT/DeiT encoders equally (no centre crop, no label reduction)."""
    return build_image_processor(config.image_size, config.image_mean, config.image_std, resample=resample)


def export_encoder(
    model: SimMIMForMaskedImageModeling | SimMIMModel,
    save_directory: str | os.PathLike,
    resample: int = 3,
    safe_serialization: bool = True,
    for_finetuning: bool = False,
    image_size: int | None = None,
    window_size: int | None = None,
) -> Path:
    """Writes the encoder as a stock transformers model folder: `config.json`, `model.safetensors` and
    `preprocessor_config.json` for the stock image processor (size, resample, mean/std of pretraining).

    `AutoModel.from_pretrained(save_directory)` then works with plain transformers, no simmim_hf needed.
    With `for_finetuning`, the encoder is written in the layout the official SimMIM fine-tuning starts from
    (`finetuning_encoder`: BEiT with mean pooling and per-block relative position tables copied from the shared one;
    Swin at an optional new `image_size` / `window_size` with its tables resampled bicubically).
    """
    if not for_finetuning and (image_size is not None or window_size is not None):
        raise ValueError("image_size/window_size: only with for_finetuning=True")
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    base = model.simmim if isinstance(model, SimMIMForMaskedImageModeling) else model
    stock = stock_encoder(model)
    config = base.config
    if for_finetuning:
        stock = finetuning_encoder(stock, image_size=image_size, window_size=window_size)
        config = copy.deepcopy(config)
        config.encoder_config.image_size = stock.config.image_size
    stock.save_pretrained(save_directory, safe_serialization=safe_serialization)
    image_processor_for(config, resample=resample).save_pretrained(save_directory)
    return save_directory


def export_finetuning_layout(
    encoder_path: str | os.PathLike,
    save_directory: str | os.PathLike,
    image_size: int | None = None,
    window_size: int | None = None,
) -> Path:
    """A stock encoder folder (e.g. a pretraining run's `encoder/`) rewritten in the official fine-tuning layout
    (`finetuning_encoder`), with its image processor (resized when `image_size` changes)."""
    from transformers import AutoImageProcessor

    encoder = AutoModel.from_pretrained(encoder_path)
    target = finetuning_encoder(encoder, image_size=image_size, window_size=window_size)
    save_directory = Path(save_directory)
    target.save_pretrained(save_directory)
    processor = AutoImageProcessor.from_pretrained(encoder_path)
    if image_size is not None:
        height, width = to_pair(image_size)
        processor.size = {"height": height, "width": width}
    processor.save_pretrained(save_directory)
    return save_directory
