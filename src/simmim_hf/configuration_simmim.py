"""SimMIM configuration: a stock transformers encoder config plus the masking and reconstruction settings.

Self-contained (imports only transformers and `backbones`) so that it also works as Hub remote code.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    BeitConfig,
    ConvNextV2Config,
    PretrainedConfig,
    ResNetConfig,
    SwinConfig,
    ViTConfig,
)

from .backbones import (
    CONV_ENCODERS,
    OFFICIAL_ENCODERS,
    SUPPORTED_ENCODERS,
    SWIN_LIKE,
    WEIGHT_DECAY_EXEMPTIONS,
    default_weight_decay_exemptions,
    is_convnet,
    output_stride,
    patch_stride,
)

INITIALIZERS = ("official", "stock")
# How a ConvNet encoder sees the mask: "sparse" (masked pixels zeroed, the keep-mask re-applied after every operation
# that mixes positions, visible-only BatchNorm/GRN statistics; the mask token enters in the decoder) or "token"
# (SimMIM's mask token replaces masked positions at the stem output, dense convolutions after it).
CONV_MASKING = ("sparse", "token")
# "linear": the paper's 1x1 convolution + PixelShuffle. "conv": FCMAE's light decoder (1x1 projection to
# `decoder_hidden_size`, the mask token at masked positions, `decoder_depth` ConvNeXt V2 blocks, 1x1 conv + PixelShuffle).
DECODER_TYPES = ("linear", "conv")
LOSS_TYPES = ("l1", "l2", "smooth_l1")
# Default width and depth of the "conv" decoder (FCMAE: 512 and 1).
DECODER_HIDDEN_SIZE = 512
DECODER_DEPTH = 1

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Fashion-MNIST's own statistics, replicated over 3 channels for the demo preset. A copy of simmim_hf.data.fashion_mnist.MEAN
# and STD (this file is Hub remote code and imports only transformers); tests/test_fashion_mnist.py keeps them equal.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def _preset_encoders() -> dict[str, tuple[PretrainedConfig, dict[str, Any]]]:
    """Preset name -> (encoder config, SimMIM settings). Built on demand so no config object is shared."""
    swin_base = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
    imagenet = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    fashion_mnist = dict(image_mean=[FASHION_MNIST_MEAN] * 3, image_std=[FASHION_MNIST_STD] * 3)
    return {
        # Tiny ViT for Fashion-MNIST on a CPU: 28px images are resized to 32px, 4px patches (8x8 grid), 8px mask
        # cells (4x4 = 16 cells, 10 masked). Greyscale is replicated to 3 channels so that stock image processors
        # and pipelines (which convert to RGB) work unchanged with the exported encoder.
        "demo": (
            ViTConfig(
                image_size=32,
                patch_size=4,
                num_channels=3,
                hidden_size=128,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=256,  # MLP ratio 2 keeps a CPU step cheap
                qkv_bias=True,
                encoder_stride=4,
            ),
            dict(mask_patch_size=8, **fashion_mnist),
        ),
        # A CPU-size ConvNeXt V2 for Fashion-MNIST (32 px images), sparse masking and FCMAE's light decoder. A 2 px
        # stem and 3 stages give an output stride of 8, so the last feature map is 4x4 (the ImageNet layout, 4 px
        # stem and 4 stages, would leave 1x1 at 32 px) and the 8 px mask cells (4x4 = 16 cells, 10 masked, as the
        # ViT demo) stay whole down to it.
        "convnextv2-demo": (
            ConvNextV2Config(
                image_size=32,
                patch_size=2,
                num_channels=3,
                num_stages=3,
                depths=[2, 2, 2],
                hidden_sizes=[32, 64, 128],
            ),
            dict(mask_patch_size=8, decoder_hidden_size=64, **fashion_mnist),
        ),
        "vit-base-patch16-224": (
            ViTConfig(image_size=224, patch_size=16, encoder_stride=16, qkv_bias=True),
            dict(mask_patch_size=32, **imagenet),
        ),
        # microsoft/SimMIM simmim_pretrain__swin_base__img192_window6__800ep.yaml: no
        # absolute position embedding, patch norm, qkv bias, MLP ratio 4, LayerNorm eps 1e-5, and stochastic depth 0.0
        # (every official Swin pretraining config; the fine-tuning configs use 0.1 and more).
        "swin-base-window6-192": (
            SwinConfig(
                image_size=192, patch_size=4, window_size=6, encoder_stride=32, drop_path_rate=0.0, **swin_base
            ),
            dict(mask_patch_size=32, **imagenet),
        ),
        # The official SimMIM ViT-B recipe (microsoft/SimMIM
        # simmim_pretrain__vit_base__img224__800ep.yaml and models/vision_transformer.py): no absolute position
        # embedding, one relative position bias shared by all blocks, layer scale initialised at 0.1, stochastic
        # depth 0.1, LayerNorm eps 1e-6, final LayerNorm on the tokens (CLS pooling; fine-tuning switches to mean
        # pooling and per-block tables, see `export_encoder(..., for_finetuning=True)`).
        "beit-base-patch16-224": (
            BeitConfig(
                image_size=224,
                patch_size=16,
                layer_norm_eps=1e-6,
                use_mask_token=True,
                use_absolute_position_embeddings=False,
                use_relative_position_bias=False,
                use_shared_relative_position_bias=True,
                layer_scale_init_value=0.1,
                drop_path_rate=0.1,
                use_mean_pooling=False,
            ),
            dict(mask_patch_size=32, **imagenet),
        ),
        # ConvNets as SparK and FCMAE pretrain them: 32 px mask cells (the output stride), ratio 0.6, sparse masking,
        # the light decoder (512 wide, 1 block), no stochastic depth.
        "convnextv2-tiny-224": (
            ConvNextV2Config(image_size=224, depths=[3, 3, 9, 3], hidden_sizes=[96, 192, 384, 768]),
            dict(mask_patch_size=32, **imagenet),
        ),
        "convnextv2-base-224": (
            ConvNextV2Config(image_size=224, depths=[3, 3, 27, 3], hidden_sizes=[128, 256, 512, 1024]),
            dict(mask_patch_size=32, **imagenet),
        ),
        "resnet50-224": (
            ResNetConfig(image_size=224, depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048]),
            dict(mask_patch_size=32, **imagenet),
        ),
    }


# Presets whose statistics are Fashion-MNIST's (kept per channel when `num_channels` is overridden).
FASHION_MNIST_PRESETS = ("demo", "convnextv2-demo")


PRESETS = tuple(_preset_encoders())


def to_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """An image or patch size as `(height, width)`: 32 -> (32, 32), [32, 48] -> (32, 48)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


# SimMIM settings that overrides may set besides the encoder's own fields (routed by `SimMIMConfig.split_overrides`).
SIMMIM_FIELDS = (
    "mask_patch_size",
    "mask_ratio",
    "image_size",
    "num_channels",
    "image_mean",
    "image_std",
    "initializer",
    "weight_decay_exemptions",
    "conv_masking",
    "decoder_type",
    "decoder_hidden_size",
    "decoder_depth",
    "loss_type",
    "norm_target",
)


def plain_value(value: Any) -> Any:
    """The one normaliser of config values: tuples as lists and mappings as dicts with string keys, recursively, so
    that values compare equal (and write to JSON) whatever container types they were given as."""
    if isinstance(value, dict):
        return {str(key): plain_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(item) for item in value]
    return value


def _constructor_kwargs(config: PretrainedConfig) -> dict[str, Any]:
    """The fewest entries of `config.to_dict()` from which the config's class rebuilds the very same config.

    Entries that the constructor derives from others (`stage_names`, `out_features`/`out_indices` for BEiT and
    Swin, Swin's `hidden_size` and `num_layers`, ViT's `pooler_output_size`, ...) or that hold the default are left
    out, so that a rebuild with changed inputs derives them again. Entries set on purpose to something else (e.g. an
    explicit `out_indices`) stay."""
    cls = type(config)
    full = config.to_dict()
    kwargs = {key: value for key, value in full.items() if key != "model_type"}
    for key in list(kwargs):
        trial = {name: value for name, value in kwargs.items() if name != key}
        try:
            same = cls(**trial).to_dict() == full
        except (ValueError, TypeError):
            same = False
        if same:
            kwargs = trial
    return kwargs


def encoder_config_fields(config: PretrainedConfig) -> set[str]:
    """Names that `rebuild_encoder_config` accepts for this encoder config: the constructor's own fields, the backbone
    selection (`out_features` / `out_indices`) where the class has one, and aliases of those (Swin's
    `num_attention_heads` for `num_heads`). Fields the constructor derives (`stage_names`, Swin's `hidden_size` and
    `num_layers`) are not among them."""
    cls = type(config)
    present = set(config.to_dict())
    if dataclasses.is_dataclass(cls):
        names = {field.name for field in dataclasses.fields(cls)} | {"output_attentions"}
        if "_out_features" in names:
            names |= {"out_features", "out_indices"}
    else:  # a config class that is not a dataclass: whatever it writes
        names = set(present)
    aliases = getattr(cls, "attribute_map", {})
    names |= {alias for alias, target in aliases.items() if target in names}
    names.add("image_size")  # SimMIM's image size, kept on the encoder config even where it is no field (ResNet)
    return {name for name in names if not name.startswith("_") and name not in ("model_type", "transformers_version")}


def rebuild_encoder_config(encoder_config: PretrainedConfig, **overrides: Any) -> PretrainedConfig:
    """A new config of the same class built from `encoder_config`'s own fields merged with `overrides`, so that every
    field the class derives in its constructor (BEiT/Swin `stage_names`, `out_features`, `out_indices`; Swin
    `hidden_size`; ViT `pooler_output_size`, ...) is derived again from the new values rather than kept stale.

    The one place where encoder overrides are applied (presets, `--config_overrides`, checkpoint overrides, a stock
    encoder's config). Raises ValueError naming the key for a field the encoder does not have, and for a field that
    its config derives from others (e.g. Swin's `hidden_size`: set `embed_dim`).
    """
    known = encoder_config_fields(encoder_config)
    model_type = encoder_config.model_type
    aliases = getattr(type(encoder_config), "attribute_map", {})
    present = set(encoder_config.to_dict())
    for key in overrides:
        if key in known:
            continue
        if key in present or aliases.get(key) in present:
            raise ValueError(f"{key}: the {model_type} encoder config derives it from its other fields; set those")
        raise ValueError(f"{key}: not a field of SimMIMConfig or of the {model_type} encoder config")
    if not overrides:
        return copy.deepcopy(encoder_config)
    rebuilt = type(encoder_config)(**{**_constructor_kwargs(encoder_config), **copy.deepcopy(overrides)})
    # Carry over what to_dict() leaves out (the attention kernel chosen at load time).
    rebuilt._attn_implementation = getattr(encoder_config, "_attn_implementation", None)
    return rebuilt


def encoder_stride_of(encoder_config: PretrainedConfig) -> int:
    """Pixels per output token side: the patch size, times 2 per Swin / ConvNet stage after the first
    (`backbones.output_stride`)."""
    return output_stride(encoder_config)


# The paper's grids are 6x6 (192 px) and 7x7 (224 px) cells; the demo's 32 px images use 4x4.
MIN_MASK_CELLS = 4


def default_mask_patch_size(encoder_config: PretrainedConfig) -> int:
    """32 px as in the paper when the image allows it, else the coarsest cell that tiles the image with at least
    `MIN_MASK_CELLS` cells per side (a 32 px image in 32 px cells would be masked whole), a multiple of the patch
    (ConvNets: of the output stride, so that every cell stays whole down to the last feature map)."""
    height, width = to_pair(encoder_config.image_size)
    patch = output_stride(encoder_config) if is_convnet(encoder_config.model_type) else patch_stride(encoder_config)
    for size in (32, 16, 8, 4, 2, 1):
        tiles = size % patch == 0 and height % size == 0 and width % size == 0
        if tiles and min(height, width) // size >= MIN_MASK_CELLS:
            return size
    return patch


def _processor_statistics(name_or_path: str, channels: int) -> tuple[list[float], list[float]] | None:
    """`(image_mean, image_std)` of the image processor saved with a model, if it has one with a value per channel."""
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    mean = [float(mean)] * channels if isinstance(mean, (int, float)) else [float(value) for value in mean]
    std = [float(std)] * channels if isinstance(std, (int, float)) else [float(value) for value in std]
    return (mean, std) if len(mean) == len(std) == channels else None


class SimMIMConfig(PretrainedConfig):
    r"""Configuration of a SimMIM model: `encoder_config` (a stock `ViTConfig`, `SwinConfig`, `Swinv2Config`,
    `DeiTConfig`, `BeitConfig`, `ConvNextConfig`, `ConvNextV2Config` or `ResNetConfig`) plus masking and
    reconstruction settings.

    Args:
        encoder_config: the encoder's config, or its dict (with `model_type`). Defaults to the `demo` preset's
            encoder (with ImageNet statistics unless given: use `from_preset("demo")` for the whole preset).
        mask_patch_size: side in pixels of a masking cell (32 in the paper).
        mask_ratio: fraction of cells masked per image (0.6 in the paper).
        image_size: overrides the encoder's image size (`int` or `[height, width]`).
        num_channels: overrides the encoder's channel count (1 for greyscale).
        image_mean / image_std: per-channel normalisation used in pretraining, written to the exported
            encoder's `preprocessor_config.json`.
        preset: name of the preset this config came from, for the model card.
        initializer: "official" (microsoft/SimMIM's init rules: BEiT-style ViT and Swin only) or "stock" (the
            transformers encoder's own init). Default: "official" for BEiT and Swin encoders, "stock" otherwise.
        weight_decay_exemptions: which parameters AdamW leaves undecayed besides biases and 1-D tensors. "official":
            microsoft/SimMIM's per-backbone lists (plain ViT: CLS token and absolute positions; Swin: mask token,
            absolute positions, relative position tables); "all-tokens": every token, position embedding, relative
            table and layer scale. Default: "official" for BEiT and Swin encoders, "all-tokens" otherwise.
        conv_masking: ConvNet encoders only: "sparse" (default; masked pixels zeroed, the keep-mask re-applied after
            every operation that mixes positions, BatchNorm and GRN statistics over visible positions only, the mask
            token in the decoder) or "token" (the mask token replaces masked positions at the stem output).
        decoder_type: "linear" (the paper's 1x1 conv + PixelShuffle; default except for sparse ConvNets) or "conv"
            (FCMAE's light decoder: 1x1 projection to `decoder_hidden_size`, the mask token at masked positions,
            `decoder_depth` ConvNeXt V2 blocks, 1x1 conv + PixelShuffle; default for sparse ConvNets).
        decoder_hidden_size / decoder_depth: width and blocks of the "conv" decoder (512 / 1, as FCMAE).
        loss_type: "l1" (default, the paper), "l2" (squared error) or "smooth_l1" (Huber, beta 1), over masked pixels
            only: `sum(loss * mask) / (sum(mask) + 1e-5) / C`.
        norm_target: reconstruct each mask cell's pixels normalised by that cell's own mean and standard deviation
            (over its pixels and channels; MAE's norm_pix_loss and FCMAE) rather than the pixels themselves.

    Derived, read-only: `model_patch_size` (encoder patch side), `encoder_stride` (pixels per output token side).
    """

    model_type = "simmim"
    sub_configs = {"encoder_config": AutoConfig}

    def __init__(
        self,
        encoder_config: PretrainedConfig | dict[str, Any] | None = None,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        image_size: int | list[int] | None = None,
        num_channels: int | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        preset: str | None = None,
        initializer: str | None = None,
        weight_decay_exemptions: str | None = None,
        conv_masking: str | None = None,
        decoder_type: str | None = None,
        decoder_hidden_size: int = DECODER_HIDDEN_SIZE,
        decoder_depth: int = DECODER_DEPTH,
        loss_type: str = "l1",
        norm_target: bool = False,
        **kwargs: Any,
    ) -> None:
        if encoder_config is None:
            encoder_config = _preset_encoders()["demo"][0]
        elif isinstance(encoder_config, dict):
            encoder_config = dict(encoder_config)
            model_type = encoder_config.pop("model_type", None)
            if model_type not in SUPPORTED_ENCODERS:
                raise ValueError(
                    f"encoder_config: unknown encoder type {model_type!r}; supported: {SUPPORTED_ENCODERS}"
                )
            encoder_config = _encoder_config_from_dict(model_type, encoder_config)
        if encoder_config.model_type not in SUPPORTED_ENCODERS:
            raise ValueError(
                f"encoder_config: unknown encoder type {encoder_config.model_type!r}; supported: {SUPPORTED_ENCODERS}"
            )
        changes: dict[str, Any] = {}
        if image_size is None and getattr(encoder_config, "image_size", None) is None:
            image_size = 224  # ResNet configs have no image size; the stock ResNets' processors crop 224 px
        if image_size is not None:
            changes["image_size"] = list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
        if num_channels is not None:
            changes["num_channels"] = int(num_channels)
        # The encoder must carry a mask token (BEiT reads this from its config; ViT/Swin take a constructor flag).
        if encoder_config.model_type == "beit":
            changes["use_mask_token"] = True
        changes = {
            key: value
            for key, value in changes.items()
            if plain_value(getattr(encoder_config, key, None)) != plain_value(value)
        }
        encoder_config = rebuild_encoder_config(encoder_config, **changes)  # a copy either way
        # Configs with an `encoder_stride` field (ViT, DeiT, Swin, Swinv2) state the one the SimMIM head uses.
        stride = encoder_stride_of(encoder_config)
        if "encoder_stride" in encoder_config_fields(encoder_config) and encoder_config.encoder_stride != stride:
            encoder_config = rebuild_encoder_config(encoder_config, encoder_stride=stride)
        self.encoder_config = encoder_config
        self.mask_patch_size = int(mask_patch_size)
        self.mask_ratio = float(mask_ratio)
        channels = encoder_config.num_channels
        self.image_mean = list(image_mean) if image_mean is not None else _default_stat(IMAGENET_MEAN, channels)
        self.image_std = list(image_std) if image_std is not None else _default_stat(IMAGENET_STD, channels)
        self.preset = preset
        official = encoder_config.model_type in OFFICIAL_ENCODERS
        self.initializer = initializer or ("official" if official else "stock")
        self.weight_decay_exemptions = weight_decay_exemptions or default_weight_decay_exemptions(
            encoder_config.model_type
        )
        convnet = is_convnet(encoder_config.model_type)
        self.conv_masking = (conv_masking or "sparse") if convnet else conv_masking
        self.decoder_type = decoder_type or ("conv" if self.conv_masking == "sparse" else "linear")
        self.decoder_hidden_size = int(decoder_hidden_size)
        self.decoder_depth = int(decoder_depth)
        self.loss_type = loss_type
        self.norm_target = bool(norm_target)
        super().__init__(**kwargs)
        self._validate()

    # Read-through attributes: the encoder config is the single source of truth.
    @property
    def image_size(self) -> int | list[int]:
        return self.encoder_config.image_size

    @property
    def num_channels(self) -> int:
        return self.encoder_config.num_channels

    @property
    def model_patch_size(self) -> int:
        """Pixels per side of one position of `bool_masked_pos` (the encoder's patch; ResNet: its stem's 4)."""
        return patch_stride(self.encoder_config)

    @property
    def encoder_stride(self) -> int:
        return encoder_stride_of(self.encoder_config)

    @property
    def encoder_type(self) -> str:
        return self.encoder_config.model_type

    def _validate(self) -> None:
        height, width = to_pair(self.image_size)
        self._validate_windows(height, width)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size <= 0:
            raise ValueError(f"mask_patch_size must be positive, got {self.mask_patch_size}")
        if height % self.mask_patch_size or width % self.mask_patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by mask_patch_size={self.mask_patch_size}"
            )
        if self.mask_patch_size % self.model_patch_size:
            raise ValueError(
                f"mask_patch_size={self.mask_patch_size} must be a multiple of the encoder's patch_size="
                f"{self.model_patch_size}"
            )
        if is_convnet(self.encoder_type) and self.mask_patch_size % self.encoder_stride:
            raise ValueError(
                f"mask_patch_size={self.mask_patch_size} must be a multiple of the {self.encoder_type} encoder's output "
                f"stride {self.encoder_stride}, so that every mask cell stays whole down to the last feature map"
            )
        if height % self.encoder_stride or width % self.encoder_stride:
            raise ValueError(f"image_size {self.image_size} must be divisible by encoder_stride={self.encoder_stride}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
        if self.weight_decay_exemptions not in WEIGHT_DECAY_EXEMPTIONS:
            raise ValueError(
                f"weight_decay_exemptions must be one of {WEIGHT_DECAY_EXEMPTIONS}, got {self.weight_decay_exemptions!r}"
            )
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(
                f"image_mean/image_std need one value per channel (num_channels={self.num_channels}), got "
                f"{len(self.image_mean)}/{len(self.image_std)}"
            )
        if not all(math.isfinite(float(v)) and float(v) > 0 for v in self.image_std):
            raise ValueError(
                f"image_std must be finite and > 0 for every channel (it divides the pixels), got {self.image_std}"
            )
        if not all(math.isfinite(float(v)) for v in self.image_mean):
            raise ValueError(f"image_mean must be finite for every channel, got {self.image_mean}")
        self._validate_reconstruction()

    def _validate_reconstruction(self) -> None:
        """The ConvNet masking mode, the decoder and the loss: known values, and combinations that work."""
        convnet = is_convnet(self.encoder_type)
        if convnet:
            encoder = self.encoder_config
            stages = {"depths": len(encoder.depths), "hidden_sizes": len(encoder.hidden_sizes)}
            if hasattr(encoder, "num_stages"):  # ConvNeXt builds num_stages stages from the two lists
                stages["num_stages"] = int(encoder.num_stages)
            if len(set(stages.values())) != 1:
                raise ValueError(
                    f"{'/'.join(stages)}: the {self.encoder_type} encoder needs one entry per stage, got "
                    + ", ".join(f"{key}={value}" for key, value in stages.items())
                )
        if self.conv_masking is not None and not convnet:
            raise ValueError(
                f"conv_masking: applies to ConvNet encoders ({', '.join(CONV_ENCODERS)}), not {self.encoder_type!r} "
                "(transformers always replace masked patches by the mask token)"
            )
        if convnet and self.conv_masking not in CONV_MASKING:
            raise ValueError(f"conv_masking must be one of {CONV_MASKING}, got {self.conv_masking!r}")
        if self.decoder_type not in DECODER_TYPES:
            raise ValueError(f"decoder_type must be one of {DECODER_TYPES}, got {self.decoder_type!r}")
        if self.decoder_type == "linear" and self.conv_masking == "sparse":
            raise ValueError(
                "decoder_type='linear' cannot reconstruct with conv_masking='sparse': a sparse encoder's features are "
                "exactly zero at masked positions, and a 1x1 head maps zeros to one constant; use decoder_type='conv' "
                "(its mask token fills them) or conv_masking='token'"
            )
        if self.decoder_type == "conv":
            if self.decoder_hidden_size <= 0 or self.decoder_depth < 0:
                raise ValueError(
                    f"decoder_hidden_size must be positive and decoder_depth >= 0, got {self.decoder_hidden_size} / "
                    f"{self.decoder_depth}"
                )
            if self.mask_patch_size % self.encoder_stride:
                raise ValueError(
                    f"decoder_type='conv' puts its mask token on the encoder's output grid: mask_patch_size="
                    f"{self.mask_patch_size} must be a multiple of the encoder stride {self.encoder_stride}"
                )
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")

    def _validate_windows(self, height: int, width: int) -> None:
        """transformers' Swin uses one `window_size` for every stage and fails in the forward pass on a stage whose
        grid is smaller than the window (the official code shrinks that stage's window instead, e.g. Swin-L at 192 px
        with window 12: stage 4 is 6x6). Refuse such a config here, naming the field."""
        encoder = self.encoder_config
        if encoder.model_type not in SWIN_LIKE:
            return
        window = encoder.window_size
        patch = self.model_patch_size
        for stage in range(len(encoder.depths)):
            grid = (height // patch // 2**stage, width // patch // 2**stage)
            if min(grid) < window:
                raise ValueError(
                    f"window_size={window} is larger than stage {stage + 1}'s {grid[0]}x{grid[1]} token grid at "
                    f"image_size {self.image_size}; transformers' {encoder.model_type} keeps one window for every stage "
                    f"and cannot run it. Use a window of at most {min(grid)} or a larger image"
                )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SimMIMConfig:
        """A named preset, with SimMIM fields (`mask_ratio=...`) or encoder fields (`hidden_size=...`) overridden."""
        presets = _preset_encoders()
        if name not in presets:
            raise ValueError(f"preset: unknown preset {name!r}; available: {list(presets)}")
        encoder_config, settings = presets[name]
        overrides = dict(overrides)
        if "num_channels" in overrides and "image_mean" not in overrides:
            channels = int(overrides["num_channels"])
            if name in FASHION_MNIST_PRESETS:
                overrides["image_mean"] = [FASHION_MNIST_MEAN] * channels
                overrides["image_std"] = [FASHION_MNIST_STD] * channels
            else:
                overrides["image_mean"] = _default_stat(IMAGENET_MEAN, channels)
                overrides["image_std"] = _default_stat(IMAGENET_STD, channels)
        return cls(encoder_config=encoder_config, preset=name, **settings).with_overrides(**overrides)

    @classmethod
    def from_encoder(cls, name_or_path: str, **overrides: Any) -> SimMIMConfig:
        """The config for continuing SimMIM pretraining from a stock encoder (Hub id or folder; a bare `ViTModel`,
        `SwinModel`, `BeitModel`, ... or one with a head, such as `ViTForImageClassification`).

        The encoder config is the checkpoint's (image size, patch, channels, every architecture field); the
        normalisation statistics are those of its image processor when it has one (else ImageNet's); the mask cell
        is 32 px where the image allows it. `overrides` are SimMIM or encoder fields, as in `from_preset`.
        Raises ValueError for an encoder type SimMIM does not support, naming the supported ones.
        """
        source = AutoConfig.from_pretrained(name_or_path)
        if source.model_type not in SUPPORTED_ENCODERS:
            raise ValueError(
                f"{name_or_path} is a {source.model_type!r} model; SimMIM continues pretraining from "
                f"{', '.join(SUPPORTED_ENCODERS)} encoders"
            )
        settings, encoder_fields = cls.split_overrides(overrides)
        # The checkpoint's head (if any) is not part of the SimMIM encoder; export names the stock encoder class.
        encoder_fields["architectures"] = None
        for key in ("image_size", "num_channels"):  # set on the encoder first: the default mask cell depends on them
            if key in settings:
                encoder_fields[key] = settings.pop(key)
        encoder_config = rebuild_encoder_config(source, **encoder_fields)
        settings.setdefault("mask_patch_size", default_mask_patch_size(encoder_config))
        if "image_mean" not in settings and "image_std" not in settings:
            statistics = _processor_statistics(name_or_path, encoder_config.num_channels)
            if statistics is not None:
                settings["image_mean"], settings["image_std"] = statistics
        return cls(encoder_config=encoder_config, **settings)

    def with_overrides(self, **overrides: Any) -> SimMIMConfig:
        """A new, validated config with SimMIM fields (`mask_ratio=...`, `image_size=...`) and encoder fields
        (`hidden_size=...`, `depths=[...]`) replaced. The encoder config is rebuilt by its own class
        (`rebuild_encoder_config`), so its derived fields follow the new values. Raises ValueError naming an unknown
        key, and for a new channel count without `image_mean`/`image_std` (the old statistics cannot follow it)."""
        changes, encoder_overrides = self.split_overrides(overrides)
        if "num_channels" in changes and "image_mean" not in changes:
            raise ValueError("num_channels: changing the channel count of a checkpoint needs image_mean and image_std")
        settings = {
            "mask_patch_size": self.mask_patch_size,
            "mask_ratio": self.mask_ratio,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "preset": self.preset,
            "initializer": self.initializer,
            "weight_decay_exemptions": self.weight_decay_exemptions,
            "conv_masking": self.conv_masking,
            "decoder_type": self.decoder_type,
            "decoder_hidden_size": self.decoder_hidden_size,
            "decoder_depth": self.decoder_depth,
            "loss_type": self.loss_type,
            "norm_target": self.norm_target,
            **changes,
        }
        encoder_config = rebuild_encoder_config(self.encoder_config, **encoder_overrides)
        return type(self)(encoder_config=encoder_config, **settings)

    @staticmethod
    def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The one routing of overrides: `(SimMIM settings, encoder fields)`, the former being the keys in
        `SIMMIM_FIELDS`. Used by `from_preset`, `from_encoder`, `with_overrides` and `for_pretraining`."""
        settings = {key: value for key, value in overrides.items() if key in SIMMIM_FIELDS}
        encoder_fields = {key: value for key, value in overrides.items() if key not in SIMMIM_FIELDS}
        return settings, encoder_fields

    @classmethod
    def for_pretraining(
        cls,
        preset: str = "demo",
        model_name_or_path: str | None = None,
        init_encoder_from: str | None = None,
        **overrides: Any,
    ) -> SimMIMConfig:
        """The config a pretraining run starts from, with `overrides` (SimMIM or encoder fields) applied and validated
        the same way whatever the start: a stock encoder (`init_encoder_from`, see `from_encoder`), a SimMIM checkpoint
        (`model_name_or_path`, see `with_overrides`), else the named `preset`. Raises ValueError naming the field at
        fault (or when both starting points are given), OSError for a source that cannot be read."""
        if init_encoder_from and model_name_or_path:
            raise ValueError(
                "--init_encoder_from and --model_name_or_path: give one (a stock encoder to start from, or a SimMIM "
                "checkpoint to continue)"
            )
        if init_encoder_from:
            return cls.from_encoder(init_encoder_from, **overrides)
        if model_name_or_path:
            return cls.from_pretrained(model_name_or_path).with_overrides(**overrides)
        return cls.from_preset(preset, **overrides)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["encoder_config"] = self.encoder_config.to_dict()
        return output


def _encoder_config_from_dict(model_type: str, values: dict[str, Any]) -> PretrainedConfig:
    """The encoder config saved in a SimMIM `config.json`. Configs written before derived fields were rebuilt (a BEiT
    or Swin whose depth was overridden by attribute) carry the default depth's `stage_names` / `out_features` /
    `out_indices`; those are derived again instead of failing the load."""
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError:
        derived = ("stage_names", "out_features", "out_indices")
        if not any(key in values for key in derived):
            raise
        return AutoConfig.for_model(model_type, **{key: value for key, value in values.items() if key not in derived})


def _default_stat(values: list[float], channels: int) -> list[float]:
    """ImageNet statistics for 3 channels; their mean for greyscale or other channel counts."""
    if channels == len(values):
        return list(values)
    return [round(sum(values) / len(values), 4)] * channels
