"""Encoder families: the one description of each backbone that pretraining, fine-tuning and evaluation know.

For every family: hierarchical or not (`is_hierarchical`), blocks (`encoder_structure`), how the stock encoder is
built with a mask token (`encoder_kwargs`), output width (`output_width`), prefix tokens (`num_prefix_tokens`), the
layer id of a parameter (`get_layer_id`), the parameters trained without weight decay (`no_weight_decay_names`) and
the training FLOPs per image used for MFU (`flops_per_image`), and the attention kernels its stock class declares
(`attention_kernels`). The model, the config, the pretraining optimizer,
layer-wise LR decay, MFU and feature extraction all ask this module.

Hub remote code: imports only torch and transformers, and travels beside `configuration_simmim.py` and
`modeling_simmim.py` (which import it relatively), so a checkpoint loads without simmim_hf.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

# Encoders SimMIM pretrains. Plain: the patch grid is flat (one token per model patch, after CLS/distillation
# tokens). Hierarchical: stages of blocks (`layers.<stage>.blocks.<block>`); the output grid is the patch grid
# downsampled by 2 per stage after the first.
PLAIN_ENCODERS = ("vit", "deit", "beit")
HIERARCHICAL_ENCODERS = ("swin", "swinv2")
# ConvNets (hierarchical too: `stages.<stage>.layers.<block>`; the last hidden state is a feature map (N, C, h, w)).
CONV_ENCODERS = ("convnext", "convnextv2", "resnet")
SUPPORTED_ENCODERS = PLAIN_ENCODERS + HIERARCHICAL_ENCODERS + CONV_ENCODERS
# Swin-like encoders that fine-tuning (layer decay) also accepts; every other type is read as plain.
SWIN_LIKE = HIERARCHICAL_ENCODERS + ("donut-swin", "maskformer-swin")
# transformers' ResNet stem: a 7x7 convolution of stride 2 and a 3x3 max-pool of stride 2.
RESNET_STEM_STRIDE = 4
# Families the official microsoft/SimMIM code implements (BEiT-style ViT, Swin): their models default to the
# official initialisation and weight-decay exemptions; the others keep the stock init and "all-tokens".
OFFICIAL_ENCODERS = ("beit", "swin")
WEIGHT_DECAY_EXEMPTIONS = ("official", "all-tokens")

# Token parameters prepended to the patch sequence, each `(1, n, dim)`.
PREFIX_TOKENS = ("cls_token", "distillation_token", "register_tokens")

# `weight_decay_exemptions="all-tokens"`: parameter-name fragments that are not weight-decayed (besides every bias
# and every 1-D tensor): every token, position embedding, relative position table and scale.
ALL_TOKENS_NO_WEIGHT_DECAY = (
    "mask_token",
    ".grn.",
    *PREFIX_TOKENS,
    "position_embeddings",
    "pos_embed",
    "relative_position_bias_table",
    "logit_scale",
    "lambda_1",
    "lambda_2",
)

# `weight_decay_exemptions="official"`: microsoft/SimMIM's optimizer.py exempts biases, 1-D tensors and the names
# each backbone lists (the same lists in pretraining and fine-tuning). Plain ViT (`no_weight_decay()` = pos_embed,
# cls_token; DeiT's distillation token counts as a CLS token): the mask token and the relative position tables ARE
# decayed. Swin (`no_weight_decay()` = absolute_pos_embed, mask_token; `no_weight_decay_keywords()` =
# relative_position_bias_table; Swin V2 adds logit_scale).
OFFICIAL_NO_WEIGHT_DECAY = {
    "plain": ("cls_token", "distillation_token", "position_embeddings", "pos_embed"),
    "hierarchical": (
        "mask_token",
        "position_embeddings",
        "absolute_pos_embed",
        "relative_position_bias_table",
        "logit_scale",
    ),
    # ConvNets (no official SimMIM recipe): ConvNeXt V2's own optimizer exempts GRN's gamma/beta (4-D tensors) besides
    # biases and 1-D tensors (every LayerNorm, BatchNorm and layer scale); SimMIM's mask tokens are exempt too.
    "conv": ("mask_token", ".grn."),
}


# transformers' attention kernels (`attn_implementation`) and the stock-model class attribute that declares each.
ATTENTION_KERNEL_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
    "flex_attention": "_supports_flex_attn",
}


def stock_encoder_class(model_type: str) -> type:
    """The stock transformers model class of an encoder family (`ViTModel` for "vit"), as `AutoModel` maps it."""
    from transformers import AutoModel
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return AutoModel._model_mapping[CONFIG_MAPPING[model_type]]


def attention_kernels(model_type: str) -> tuple[str, ...]:
    """The `attn_implementation` values an encoder family runs: "eager", then each kernel its stock class declares
    (`_supports_sdpa`, `_supports_flash_attn`, `_supports_flex_attn`, read from the installed transformers).
    ConvNets, which have no attention, run "eager" only."""
    declared = stock_encoder_class(model_type)
    return ("eager", *(kernel for kernel, flag in ATTENTION_KERNEL_FLAGS.items() if getattr(declared, flag, False)))


def check_attention_kernel(model_type: str, attn_implementation: str | None) -> None:
    """ValueError naming the family and its kernels when it does not run `attn_implementation` (None: the default,
    sdpa where declared, else eager)."""
    kernels = attention_kernels(model_type)
    if attn_implementation is not None and attn_implementation not in kernels:
        raise ValueError(
            f"attn_implementation {attn_implementation!r}: the {model_type} encoder "
            f"({stock_encoder_class(model_type).__name__}) runs {', '.join(kernels)} only"
        )


def is_hierarchical(model_type: str) -> bool:
    """Blocks grouped in stages (Swin-like or a ConvNet) rather than plain ViT-like."""
    return model_type in SWIN_LIKE or model_type in CONV_ENCODERS


def is_convnet(model_type: str) -> bool:
    """A ConvNet encoder (ConvNeXt, ConvNeXt V2, ResNet): feature maps rather than tokens, sparse masking."""
    return model_type in CONV_ENCODERS


def patch_stride(config: Any) -> int:
    """Pixels per side of one position of the encoder's first feature map (the grid `bool_masked_pos` lives on):
    the patch size of a transformer or a ConvNeXt stem, 4 for ResNet's stem (7x7 conv stride 2 + max-pool)."""
    config = encoder_config_of(config)
    if config.model_type == "resnet":
        return RESNET_STEM_STRIDE
    patch = config.patch_size
    return int(patch[0] if isinstance(patch, (list, tuple)) else patch)


def output_stride(config: Any) -> int:
    """Pixels per side of one position of the last hidden state: the patch stride, times 2 per stage after the
    first (Swin, ConvNeXt, ResNet; ResNet also in its first stage with `downsample_in_first_stage`)."""
    config = encoder_config_of(config)
    stride = patch_stride(config)
    if not is_hierarchical(config.model_type):
        return stride
    stride *= 2 ** (len(config.depths) - 1)
    if config.model_type == "resnet" and config.downsample_in_first_stage:
        stride *= 2
    return stride


class EncoderStructure(NamedTuple):
    """Blocks of an encoder: `num_layers` in all, `depths` per stage (hierarchical encoders only, else None)."""

    model_type: str
    num_layers: int
    depths: list[int] | None


def encoder_config_of(config: Any) -> Any:
    """The encoder's config: a SimMIM config (`model_type == "simmim"`) is unwrapped to its `encoder_config`."""
    return config.encoder_config if getattr(config, "model_type", None) == "simmim" else config


def encoder_structure(config: Any) -> EncoderStructure:
    """Model type, number of blocks and blocks per stage of the encoder `config` describes (SimMIM or stock)."""
    config = encoder_config_of(config)
    model_type = config.model_type
    if is_hierarchical(model_type):
        depths = [int(depth) for depth in config.depths]
        return EncoderStructure(model_type, sum(depths), depths)
    num_layers = getattr(config, "num_hidden_layers", None)
    if num_layers is None:
        raise ValueError(f"cannot find the number of blocks of a {model_type!r} encoder (no num_hidden_layers)")
    return EncoderStructure(model_type, int(num_layers), None)


def encoder_kwargs(config: Any) -> dict[str, Any]:
    """Constructor arguments of the stock encoder class inside SimMIM: no pooler, and a mask token (BEiT reads
    `use_mask_token` from its config, which `SimMIMConfig` sets; the others take a constructor flag)."""
    model_type = encoder_config_of(config).model_type
    if is_convnet(model_type):  # no pooler argument; the mask token of token mode lives in SimMIMModel
        return {}
    kwargs: dict[str, Any] = {"add_pooling_layer": False}
    if model_type != "beit":
        kwargs["use_mask_token"] = True
    return kwargs


def output_width(config: Any) -> int:
    """Channels of the encoder's last hidden state (Swin: the width doubles per stage after the first; ConvNets: the
    last of `hidden_sizes`)."""
    config = encoder_config_of(config)
    if is_convnet(config.model_type):
        return int(config.hidden_sizes[-1])
    if is_hierarchical(config.model_type):
        return int(config.embed_dim * 2 ** (len(config.depths) - 1))
    return int(config.hidden_size)


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens the encoder puts before the patch tokens (CLS, distillation, registers), counted from its parameters:
    `last_hidden_state` is `(N, num_prefix_tokens + patches, D)`."""
    return sum(p.shape[-2] for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in PREFIX_TOKENS)


_BLOCK = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_SWIN_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.blocks\.(\d+)\.")
_SWIN_DOWNSAMPLE = re.compile(r"(?:^|\.)layers\.(\d+)\.downsample\.")
_TIMM_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_TIMM_EMBEDDING = re.compile(r"(?:^|\.)(?:patch_embed|pos_embed)(?:\.|$)")
_TOKENS = ("embeddings", "mask_token", *PREFIX_TOKENS)
_CONV_BLOCK = re.compile(r"(?:^|\.)stages\.(\d+)\.layers\.(\d+)\.")
_CONV_DOWNSAMPLE = re.compile(r"(?:^|\.)stages\.(\d+)\.downsampling_layer\.")
_RESNET_STEM = re.compile(r"(?:^|\.)embedder\.")


def get_layer_id(param_name: str, num_layers: int, model_type: str, depths: Sequence[int] | None = None) -> int:
    """Layer id in `[0, num_layers + 1]` for layer-wise LR decay, for any prefix and both transformers naming schemes
    (`layers.3.` in memory since 5.2x, `encoder.layer.3.` on disk; also timm's `blocks.3.`, `patch_embed`,
    `pos_embed`).

    0 = embeddings, tokens, mask token (ConvNets: the stem); i + 1 = block i (Swin: counted across stages, a stage's
    downsampling goes with its last block; ConvNeXt: a stage's downsampling goes with its first block, as ConvNeXt V2's
    per-block layer decay; ResNet: a block's shortcut is part of it); num_layers + 1 = everything else: final norm, pooler, heads and BEiT's relative position bias
    shared by all blocks (as in the official BEiT and SimMIM fine-tuning recipes).

    Args:
        param_name: a name from `named_parameters()` or a state dict, with any prefix.
        num_layers: number of transformer blocks (Swin: `sum(depths)`); `encoder_structure` reads both.
        model_type: the encoder's `config.model_type` ("vit", "beit", "swin", ...).
        depths: blocks per stage, required for hierarchical encoders.

    Raises ValueError for a block or stage the encoder does not have.
    """
    if is_hierarchical(model_type):
        if depths is None:
            raise ValueError(f"depths (blocks per stage) is required for model_type={model_type!r}")
        if sum(depths) != num_layers:
            raise ValueError(f"num_layers={num_layers} must equal sum(depths)={sum(depths)} for Swin")
    if any(key in param_name for key in _TOKENS) or _TIMM_EMBEDDING.search(param_name):
        return 0
    if is_convnet(model_type):
        return _conv_layer_id(param_name, num_layers, list(depths))
    if not is_hierarchical(model_type):
        match = _BLOCK.search(param_name) or _TIMM_BLOCK.search(param_name)
        if match is None:
            return num_layers + 1
        block = int(match.group(1))
        if block >= num_layers:
            raise ValueError(f"{param_name!r} is block {block}, but the encoder has num_layers={num_layers} blocks")
        return block + 1
    depths = list(depths)
    match = _SWIN_BLOCK.search(param_name) or _SWIN_DOWNSAMPLE.search(param_name)
    if match is None:
        return num_layers + 1
    stage = int(match.group(1))
    if stage >= len(depths):
        raise ValueError(f"{param_name!r} is in stage {stage}, but depths={depths} has {len(depths)} stages")
    if match.lastindex == 1:  # patch merging at the end of the stage
        return sum(depths[: stage + 1])
    block = int(match.group(2))
    if block >= depths[stage]:
        raise ValueError(f"{param_name!r}: block {block} does not exist in stage {stage} (depth {depths[stage]})")
    return sum(depths[:stage]) + block + 1


def _conv_layer_id(param_name: str, num_layers: int, depths: list[int]) -> int:
    """`get_layer_id` for ConvNeXt / ConvNeXt V2 / ResNet names."""
    if _RESNET_STEM.search(param_name):
        return 0
    match = _CONV_BLOCK.search(param_name)
    down = _CONV_DOWNSAMPLE.search(param_name) if match is None else None
    if match is None and down is None:
        return num_layers + 1
    stage = int((match or down).group(1))
    if stage >= len(depths):
        raise ValueError(f"{param_name!r} is in stage {stage}, but depths={depths} has {len(depths)} stages")
    if match is None:  # downsampling at the start of the stage: with its first block
        return sum(depths[:stage]) + 1
    block = int(match.group(2))
    if block >= depths[stage]:
        raise ValueError(f"{param_name!r}: block {block} does not exist in stage {stage} (depth {depths[stage]})")
    return sum(depths[:stage]) + block + 1


def default_weight_decay_exemptions(model_type: str) -> str:
    """ "official" for the families microsoft/SimMIM implements (BEiT, Swin), "all-tokens" for the others."""
    return "official" if model_type in OFFICIAL_ENCODERS else "all-tokens"


def no_weight_decay_keywords(model_type: str, exemptions: str = "official") -> tuple[str, ...]:
    """Name fragments exempt from weight decay (besides biases and 1-D tensors) for an encoder type.

    exemptions: "official" (microsoft/SimMIM's per-backbone lists, `OFFICIAL_NO_WEIGHT_DECAY`) or "all-tokens"
    (`ALL_TOKENS_NO_WEIGHT_DECAY`).
    """
    if exemptions == "all-tokens":
        return ALL_TOKENS_NO_WEIGHT_DECAY
    if exemptions != "official":
        raise ValueError(f"weight_decay_exemptions must be one of {WEIGHT_DECAY_EXEMPTIONS}, got {exemptions!r}")
    if is_convnet(model_type):
        return OFFICIAL_NO_WEIGHT_DECAY["conv"]
    return OFFICIAL_NO_WEIGHT_DECAY["hierarchical" if is_hierarchical(model_type) else "plain"]


def is_weight_decay_exempt(name: str, param: torch.Tensor, keywords: Sequence[str]) -> bool:
    """The official rule: 1-D tensors, biases, and names containing one of `keywords`."""
    return param.ndim <= 1 or name.endswith(".bias") or any(key in name for key in keywords)


def resolve_weight_decay_exemptions(config: Any, exemptions: str | None = None) -> str:
    """`exemptions` when given, else a SimMIM config's `weight_decay_exemptions`, else the family's default (so a
    stock encoder or classifier fine-tunes with the exemptions its family pretrains with)."""
    if exemptions is None and getattr(config, "model_type", None) == "simmim":
        exemptions = getattr(config, "weight_decay_exemptions", None)
    return exemptions or default_weight_decay_exemptions(encoder_config_of(config).model_type)


def no_weight_decay_names(
    model: nn.Module,
    exemptions: str | None = None,
    named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None,
) -> set[str]:
    """Names of the parameters trained without weight decay: every bias and 1-D tensor (norms, layer scale), plus
    the names the exemption setting lists for the model's backbone (`model.config`: SimMIM or a stock encoder's).

    exemptions: "official" (microsoft/SimMIM per backbone: plain ViT the CLS token and absolute positions; Swin the
    mask token, absolute positions and relative position tables) or "all-tokens" (every token, position embedding,
    relative position table and scale); None: `resolve_weight_decay_exemptions(model.config)`.
    """
    exemptions = resolve_weight_decay_exemptions(model.config, exemptions)
    keywords = no_weight_decay_keywords(encoder_config_of(model.config).model_type, exemptions)
    named = named_parameters if named_parameters is not None else model.named_parameters()
    return {name for name, param in named if is_weight_decay_exempt(name, param, keywords)}


def flops_per_image(config: Any, matmul_params: int, tokens: int) -> float:
    """Approximate training FLOPs per image: 6 x `matmul_params` (parameters with >= 2 dims) x `tokens` (patches
    per image) for the dense layers, plus attention's 12 x layers x tokens^2 x width for plain encoders.
    Hierarchical encoders: tokens shrink 4x per stage and most weights sit in stage 3, so 6 x params x tokens / 16
    (windowed attention is cheaper and ignored). ConvNets: counted layer by layer (`conv_forward_macs`), 6 x MACs
    (the arguments are not used)."""
    config = encoder_config_of(config)
    if is_convnet(config.model_type):
        return 6.0 * conv_forward_macs(config)
    if is_hierarchical(config.model_type):
        return 6.0 * matmul_params * tokens / 16
    attention = 12.0 * config.num_hidden_layers * tokens**2 * config.hidden_size
    return 6.0 * matmul_params * tokens + attention


def _conv_macs(c_in: int, c_out: int, kernel: int, positions: int, groups: int = 1) -> int:
    """Multiply-accumulates of a convolution (or a linear layer: kernel 1) producing `positions` outputs."""
    return c_in // groups * c_out * kernel * kernel * positions


def conv_forward_macs(config: Any) -> int:
    """Forward multiply-accumulates per image of a ConvNeXt / ConvNeXt V2 / ResNet encoder at the config's image size:
    every convolution and linear layer (norms, activations, GRN, pooling and residual adds are left out: a few per
    cent). Sparse masking is emulated densely, so it costs what a dense pass costs."""
    config = encoder_config_of(config)
    size = config.image_size
    height, width = (int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size))
    depths, widths = list(config.depths), list(config.hidden_sizes)
    if config.model_type in ("convnext", "convnextv2"):
        patch = patch_stride(config)
        positions = (height // patch) * (width // patch)
        macs = _conv_macs(config.num_channels, widths[0], patch, positions)
        previous = widths[0]
        for stage, (depth, dim) in enumerate(zip(depths, widths)):
            if stage > 0:  # downsampling: a 2x2 convolution of stride 2
                positions //= 4
                macs += _conv_macs(previous, dim, 2, positions)
            # a block: 7x7 depthwise convolution, then two pointwise layers dim -> 4 dim -> dim
            macs += depth * (
                _conv_macs(dim, dim, 7, positions, groups=dim) + 2 * _conv_macs(dim, 4 * dim, 1, positions)
            )
            previous = dim
        return macs
    if config.model_type != "resnet":
        raise ValueError(f"conv_forward_macs: {config.model_type!r} is not a ConvNet encoder")
    positions = (height // 2) * (width // 2)
    macs = _conv_macs(config.num_channels, config.embedding_size, 7, positions)
    positions //= 4  # max-pool, stride 2
    previous = config.embedding_size
    bottleneck = config.layer_type == "bottleneck"
    for stage, (depth, dim) in enumerate(zip(depths, widths)):
        stride = 2 if stage > 0 or config.downsample_in_first_stage else 1
        for block in range(depth):
            c_in, block_stride = (previous, stride) if block == 0 else (dim, 1)
            out_positions = positions // block_stride**2
            if c_in != dim or block_stride != 1:  # shortcut: 1x1 convolution at the output resolution
                macs += _conv_macs(c_in, dim, 1, out_positions)
            if bottleneck:
                reduced = dim // 4
                first = out_positions if config.downsample_in_bottleneck else positions
                macs += _conv_macs(c_in, reduced, 1, first)
                macs += _conv_macs(reduced, reduced, 3, out_positions)
                macs += _conv_macs(reduced, dim, 1, out_positions)
            else:
                macs += _conv_macs(c_in, dim, 3, out_positions) + _conv_macs(dim, dim, 3, out_positions)
            positions = out_positions
        previous = dim
    return macs
