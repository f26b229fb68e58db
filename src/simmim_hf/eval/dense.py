"""Exported encoders as multi-scale backbones for dense-prediction heads (UperNet, Mask2Former, ...).

An exported Swin or BEiT encoder folder is a stock `SwinModel`/`BeitModel`; transformers' `SwinBackbone` and
`BeitBackbone` read the same config and weights and return feature maps at several strides (`out_features`). Swin
gives stage maps at strides 4, 8, 16, 32 directly; a plain BEiT gives every block at the patch stride, and
`add_fpn=True` (with 4 `out_indices`) resamples four of them to strides 4, 8, 16, 32. Plain ViT has no backbone class
in transformers: pretrain the `beit-base-patch16-224` preset (the official SimMIM ViT-B) for dense prediction.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoBackbone, AutoConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING


def load_backbone(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedModel:
    """`AutoBackbone.from_pretrained(name_or_path, **kwargs)` that also takes a local folder.

    transformers 5.24's `AutoBackbone.from_pretrained` first asks the Hub whether the name is a model repository (to
    fall back to timm otherwise), so a local folder fails with `HFValidationError` before anything is loaded. For a
    folder this picks the class `AutoBackbone` maps its config to (`SwinBackbone`, `BeitBackbone`, ...) and calls its
    `from_pretrained`; Hub ids go to `AutoBackbone` unchanged. `kwargs` are config fields (`out_features`,
    `out_indices`, `add_fpn`, ...) and loading options.
    """
    if not os.path.isdir(name_or_path):
        return AutoBackbone.from_pretrained(name_or_path, **kwargs)
    config = AutoConfig.from_pretrained(name_or_path)
    if type(config) not in MODEL_FOR_BACKBONE_MAPPING:
        raise ValueError(
            f"{name_or_path}: transformers has no backbone class for a {config.model_type!r} encoder (Swin, Swinv2 "
            "and BEiT have one; for a plain ViT pretrain the beit-base-patch16-224 preset)"
        )
    return MODEL_FOR_BACKBONE_MAPPING[type(config)].from_pretrained(name_or_path, **kwargs)
