"""Layer-wise learning-rate decay for fine-tuning transformer encoders (BEiT / SimMIM / MAE recipe).

Every parameter gets a *layer id* (`backbones.get_layer_id`, the one implementation, also `model.layer_id(name)`):
0 for the patch/position embeddings and special tokens, `i + 1` for transformer block `i`, and `num_layers + 1` for
everything else (final norm, pooler, classifier head, decoder, and BEiT's relative position bias shared by all
blocks, as in BEiT's own recipe).
A parameter with layer id `l` is trained at `base_lr * layer_decay ** (num_layers + 1 - l)`, so the head learns at
the full rate and the embeddings at the smallest one.

Swin has stages of blocks; blocks are counted across stages (stage `s`, block `b` -> `sum(depths[:s]) + b + 1`) and
the patch-merging layer at the end of stage `s` shares the id of that stage's last block. ConvNets (ConvNeXt,
ConvNeXt V2, ResNet) count blocks the same way; the stem is layer 0, a ConvNeXt stage's downsampling shares the id of
the stage's first block, and a ResNet block's shortcut is part of its block.

Names are matched by pattern, so the in-memory names of transformers 5 (`vit.layers.3.attention.q_proj.weight`),
the legacy on-disk names (`encoder.layer.3.attention.attention.query.weight`) and any wrapper prefix (a SimMIM model
holding the stock encoder under some attribute) all resolve to the same id.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from simmim_hf.backbones import (
    encoder_structure,
    get_layer_id,
    is_hierarchical,
    is_weight_decay_exempt,
    no_weight_decay_keywords,
    resolve_weight_decay_exemptions,
)

# Default decay per backbone family, from the SimMIM paper's fine-tuning settings.
DEFAULT_LAYER_DECAY = {"vit": 0.65, "swin": 0.9}


def default_layer_decay(model_type: str) -> float:
    """0.9 for Swin-like encoders and ConvNets (stages of blocks), 0.65 for ViT/BEiT-like ones (SimMIM paper)."""
    return DEFAULT_LAYER_DECAY["swin" if is_hierarchical(model_type) else "vit"]


def param_groups_layer_decay(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
    no_weight_decay: Sequence[str] | None = None,
    named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
    weight_decay_exemptions: str | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise LR decay and no weight decay on 1-D params, biases and the
    backbone's exempt names (CLS token and positions; Swin: relative position tables).

    Args:
        model: a transformers model whose `config` is a ViT/BEiT/DeiT/Swin config (or a SimMIM config).
        base_lr: peak learning rate of the top layer (the head).
        weight_decay: weight decay of the decayed groups.
        layer_decay: multiplicative decay per layer; `None` picks the SimMIM default (0.65 ViT, 0.9 Swin).
        no_weight_decay: substrings of parameter names excluded from weight decay (1-D params and biases always
            are); `None` takes them from `weight_decay_exemptions`.
        named_parameters: overrides `model.named_parameters()` (e.g. to pass a subset).
        weight_decay_exemptions: "official" (microsoft/SimMIM's per-backbone lists) or "all-tokens" (every token,
            position embedding, relative position table and scale); `None`: a SimMIM config's own setting, else the
            family's default ("official" for BEiT and Swin, "all-tokens" otherwise). The same rule as pretraining's
            `model.no_weight_decay()` (`backbones.no_weight_decay_names`).

    Returns: a list of dicts with `params`, `lr` (= base_lr * lr_scale), `lr_scale`, `weight_decay`, `layer_id` and
    `names`; frozen parameters (`requires_grad=False`) are left out.
    """
    model_type, num_layers, depths = encoder_structure(model.config)
    if layer_decay is None:
        layer_decay = default_layer_decay(model_type)
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if no_weight_decay is None:
        exemptions = resolve_weight_decay_exemptions(model.config, weight_decay_exemptions)
        no_weight_decay = no_weight_decay_keywords(model_type, exemptions)
    keywords = tuple(no_weight_decay)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named_parameters if named_parameters is not None else model.named_parameters():
        if not param.requires_grad:
            continue
        layer_id = get_layer_id(name, num_layers, model_type, depths)
        decay = not is_weight_decay_exempt(name, param, keywords)
        if (layer_id, decay) not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[(layer_id, decay)] = {
                "params": [],
                "names": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": layer_id,
            }
        groups[(layer_id, decay)]["params"].append(param)
        groups[(layer_id, decay)]["names"].append(name)
    return [groups[key] for key in sorted(groups)]
