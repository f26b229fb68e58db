"""State-dict adapters between simmim_hf and transformers' own masked-image-modeling classes, and encoder export.

All conversions go through module objects (`load_state_dict` on identical stock submodules), never through
hand-written key tables, so they hold whatever names the installed transformers uses in memory; on disk, stock
classes write their own (legacy) layout through `save_pretrained`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from transformers import AutoModel, AutoModelForMaskedImageModeling, PreTrainedModel, ViTImageProcessor

from .configuration_simmim import SimMIMConfig, default_mask_patch_size, rebuild_encoder_config, to_pair
from .modeling_simmim import SimMIMForMaskedImageModeling, SimMIMModel

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


def image_processor_for(config: SimMIMConfig, resample: int = 3) -> ViTImageProcessor:
    """The stock image processor matching pretraining: resize to `image_size`, rescale to [0, 1], normalise with the
    pretraining mean/std (`resample`: PIL code, 3 = bicubic). `ViTImageProcessor` is the stock processor of ViT and
    Swin, and serves BEiT/DeiT encoders equally (no centre crop, no label reduction)."""
    height, width = to_pair(config.image_size)
    return ViTImageProcessor(
        do_resize=True,
        size={"height": height, "width": width},
        resample=resample,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        # Greyscale/RGBA/palette inputs become RGB for a 3-channel encoder, as in pretraining.
        do_convert_rgb=config.num_channels == 3,
    )


def export_encoder(
    model: SimMIMForMaskedImageModeling | SimMIMModel,
    save_directory: str | os.PathLike,
    resample: int = 3,
    safe_serialization: bool = True,
) -> Path:
    """Writes the encoder as a stock transformers model folder: `config.json`, `model.safetensors` and
    `preprocessor_config.json` for the stock image processor (size, resample, mean/std of pretraining).

    `AutoModel.from_pretrained(save_directory)` then works with plain transformers, no simmim_hf needed.
    """
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    base = model.simmim if isinstance(model, SimMIMForMaskedImageModeling) else model
    stock = stock_encoder(model)
    stock.save_pretrained(save_directory, safe_serialization=safe_serialization)
    image_processor_for(base.config, resample=resample).save_pretrained(save_directory)
    return save_directory
