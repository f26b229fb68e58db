"""SimMIM configuration: a stock transformers encoder config plus the masking and reconstruction settings.

Self-contained (imports only transformers) so that it also works as Hub remote code.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers import AutoConfig, BeitConfig, PretrainedConfig, SwinConfig, ViTConfig

# Encoders whose patch grid is flat (one token per model patch, plus CLS/distillation tokens).
PLAIN_ENCODERS = ("vit", "deit", "beit")
# Hierarchical encoders: the output grid is the patch grid downsampled by 2 per stage after the first.
HIERARCHICAL_ENCODERS = ("swin", "swinv2")
SUPPORTED_ENCODERS = PLAIN_ENCODERS + HIERARCHICAL_ENCODERS
# Encoder families the official microsoft/SimMIM code implements (BEiT-style ViT, Swin): their models default to the
# official initialisation and weight-decay exemptions; the others keep the stock ones.
OFFICIAL_ENCODERS = ("beit", "swin")
INITIALIZERS = ("official", "stock")
WEIGHT_DECAY_EXEMPTIONS = ("official", "all-tokens")

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# Fashion-MNIST's own statistics, replicated over 3 channels for the demo preset. A copy of simmim_hf.fashion_mnist.MEAN
# and STD (this file is Hub remote code and imports only transformers); tests/test_fashion_mnist.py keeps them equal.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


def _preset_encoders() -> dict[str, tuple[PretrainedConfig, dict[str, Any]]]:
    """Preset name -> (encoder config, SimMIM settings). Built on demand so no config object is shared."""
    swin_base = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
    swin_large = dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48])
    imagenet = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
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
            dict(
                mask_patch_size=8,
                image_mean=[FASHION_MNIST_MEAN] * 3,
                image_std=[FASHION_MNIST_STD] * 3,
            ),
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
        # microsoft/SimMIM simmim_pretrain__swin_large__img192_window12__800ep.yaml.
        "swin-large-window12-192": (
            SwinConfig(
                image_size=192, patch_size=4, window_size=12, encoder_stride=32, drop_path_rate=0.0, **swin_large
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
    }


PRESETS = tuple(_preset_encoders())


def to_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """An image or patch size as `(height, width)`: 32 -> (32, 32), [32, 48] -> (32, 48)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def encoder_stride_of(encoder_config: PretrainedConfig) -> int:
    """Pixels per output token side: the patch size, times 2 per Swin stage after the first."""
    patch = to_pair(encoder_config.patch_size)[0]
    if encoder_config.model_type in HIERARCHICAL_ENCODERS:
        return patch * 2 ** (len(encoder_config.depths) - 1)
    return patch


class SimMIMConfig(PretrainedConfig):
    r"""Configuration of a SimMIM model: `encoder_config` (a stock `ViTConfig`, `SwinConfig`, `Swinv2Config`,
    `DeiTConfig` or `BeitConfig`) plus masking and reconstruction settings.

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
            encoder_config = AutoConfig.for_model(model_type, **encoder_config)
        else:
            encoder_config = copy.deepcopy(encoder_config)
        if encoder_config.model_type not in SUPPORTED_ENCODERS:
            raise ValueError(
                f"encoder_config: unknown encoder type {encoder_config.model_type!r}; supported: {SUPPORTED_ENCODERS}"
            )
        if image_size is not None:
            encoder_config.image_size = list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
        if num_channels is not None:
            encoder_config.num_channels = int(num_channels)
        # The encoder must carry a mask token (BEiT reads this from its config; ViT/Swin take a constructor flag).
        if encoder_config.model_type == "beit":
            encoder_config.use_mask_token = True
        encoder_config.encoder_stride = encoder_stride_of(encoder_config)
        self.encoder_config = encoder_config
        self.mask_patch_size = int(mask_patch_size)
        self.mask_ratio = float(mask_ratio)
        channels = encoder_config.num_channels
        self.image_mean = list(image_mean) if image_mean is not None else _default_stat(IMAGENET_MEAN, channels)
        self.image_std = list(image_std) if image_std is not None else _default_stat(IMAGENET_STD, channels)
        self.preset = preset
        official = encoder_config.model_type in OFFICIAL_ENCODERS
        self.initializer = initializer or ("official" if official else "stock")
        self.weight_decay_exemptions = weight_decay_exemptions or ("official" if official else "all-tokens")
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
        return to_pair(self.encoder_config.patch_size)[0]

    @property
    def encoder_stride(self) -> int:
        return encoder_stride_of(self.encoder_config)

    @property
    def encoder_type(self) -> str:
        return self.encoder_config.model_type

    def _validate(self) -> None:
        height, width = to_pair(self.image_size)
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

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SimMIMConfig:
        """A named preset, with SimMIM fields (`mask_ratio=...`) or encoder fields (`hidden_size=...`) overridden."""
        presets = _preset_encoders()
        if name not in presets:
            raise ValueError(f"preset: unknown preset {name!r}; available: {list(presets)}")
        encoder_config, settings = presets[name]
        simmim_fields = {"mask_patch_size", "mask_ratio", "image_size", "num_channels", "image_mean", "image_std"}
        for key, value in overrides.items():
            if key in simmim_fields:
                settings[key] = value
            elif hasattr(encoder_config, key):
                setattr(encoder_config, key, value)
            else:
                raise ValueError(f"{key}: not a field of SimMIMConfig or of the {encoder_config.model_type} encoder")
        if "num_channels" in overrides and "image_mean" not in overrides and name == "demo":
            channels = int(overrides["num_channels"])
            settings["image_mean"] = [FASHION_MNIST_MEAN] * channels
            settings["image_std"] = [FASHION_MNIST_STD] * channels
        elif "num_channels" in overrides and "image_mean" not in overrides:
            settings["image_mean"] = _default_stat(IMAGENET_MEAN, int(overrides["num_channels"]))
            settings["image_std"] = _default_stat(IMAGENET_STD, int(overrides["num_channels"]))
        return cls(encoder_config=encoder_config, preset=name, **settings)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["encoder_config"] = self.encoder_config.to_dict()
        return output


def _default_stat(values: list[float], channels: int) -> list[float]:
    """ImageNet statistics for 3 channels; their mean for greyscale or other channel counts."""
    if channels == len(values):
        return list(values)
    return [round(sum(values) / len(values), 4)] * channels
