"""Exported encoders as multi-scale backbones for dense-prediction heads (UperNet, Mask2Former, ...).

An exported Swin or BEiT encoder folder is a stock `SwinModel`/`BeitModel`; transformers' `SwinBackbone` and
`BeitBackbone` read the same config and weights and return feature maps at several strides (`out_features`). Swin
gives stage maps at strides 4, 8, 16, 32 directly; a plain BEiT gives every block at the patch stride, and
`add_fpn=True` (with 4 `out_indices`) resamples four of them to strides 4, 8, 16, 32. ConvNeXt, ConvNeXt V2 and
ResNet give their stages. `multiscale_settings(config)` picks these fields for any family. Plain ViT has no backbone class
in transformers: pretrain the `beit-base-patch16-224` preset (the official SimMIM ViT-B) for dense prediction.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoBackbone, AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING

from simmim_hf.errors import UsageError


def no_backbone_message(name_or_path: str | os.PathLike, model_type: str) -> str:
    return (
        f"{name_or_path}: transformers has no backbone class for a {model_type!r} encoder (Swin, Swinv2, BEiT, "
        "ConvNeXt, ConvNeXt V2 and ResNet have one; for a plain ViT pretrain the beit-base-patch16-224 preset)"
    )


def has_backbone_class(config: PretrainedConfig) -> bool:
    """Whether transformers has a backbone class (`AutoBackbone`) for this encoder config."""
    return type(config) in MODEL_FOR_BACKBONE_MAPPING


def multiscale_settings(config: PretrainedConfig) -> dict[str, Any]:
    """Backbone config fields giving four (or, for a shallower encoder, every) scales of `config`'s encoder.

    Hierarchical encoders (Swin, Swin V2, ConvNeXt, ConvNeXt V2, ResNet) give every stage (`out_features`); a plain
    BEiT gives four evenly spaced blocks resampled by its FPN to 4x, 2x, 1x and 1/2x its patch grid (an encoder
    with fewer than 4 blocks repeats some). `UsageError` for a family without a backbone class (plain ViT).
    """
    if not has_backbone_class(config):
        raise UsageError(no_backbone_message("--model", config.model_type))
    if config.model_type == "beit":
        layers = int(config.num_hidden_layers)
        indices = [max(1, round(layers * k / 4)) for k in (1, 2, 3, 4)]
        return dict(out_indices=indices, add_fpn=True, reshape_hidden_states=True)
    return dict(out_features=[name for name in config.stage_names if name != "stem"])


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
    if not has_backbone_class(config):
        raise ValueError(no_backbone_message(name_or_path, config.model_type))
    return MODEL_FOR_BACKBONE_MAPPING[type(config)].from_pretrained(name_or_path, **kwargs)


# What a backbone adds to an exported encoder (new per-scale norms, BEiT's FPN) and leaves out of it (the final norm,
# the pooler): expected, so left out of transformers' load report.
_NEW_IN_BACKBONE = ("hidden_states_norms.", "fpn")
_UNUSED_BY_BACKBONE = ("pooler.", "layernorm.")


def load_dense_backbone(folder: str, **settings: Any) -> PreTrainedModel:
    """`load_backbone(folder, **settings)` of an exported encoder folder, reporting only unexpected load surprises."""
    from simmim_hf.eval.features import load_reporting_surprises

    config = AutoConfig.from_pretrained(folder)
    if not has_backbone_class(config):
        raise UsageError(no_backbone_message(folder, config.model_type))
    return load_reporting_surprises(
        MODEL_FOR_BACKBONE_MAPPING[type(config)].from_pretrained,
        folder,
        expected_unexpected=_UNUSED_BY_BACKBONE,
        expected_missing=_NEW_IN_BACKBONE,
        **settings,
    )
