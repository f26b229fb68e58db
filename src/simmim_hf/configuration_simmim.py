"""SimMIM configuration: a stock transformers encoder config plus the masking and reconstruction settings.

Self-contained (imports only transformers and `backbones`) so that it also works as Hub remote code.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from transformers import AutoConfig, AutoImageProcessor, BeitConfig, PretrainedConfig, SwinConfig, ViTConfig

from .backbones import (
    OFFICIAL_ENCODERS,
    SUPPORTED_ENCODERS,
    WEIGHT_DECAY_EXEMPTIONS,
    default_weight_decay_exemptions,
    is_hierarchical,
)

INITIALIZERS = ("official", "stock")

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
)


def _plain(value: Any) -> Any:
    """Tuples as lists (recursively), for comparing config values whatever sequence type they were given as."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
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
    """Pixels per output token side: the patch size, times 2 per Swin stage after the first."""
    patch = to_pair(encoder_config.patch_size)[0]
    if is_hierarchical(encoder_config.model_type):
        return patch * 2 ** (len(encoder_config.depths) - 1)
    return patch


# The paper's grids are 6x6 (192 px) and 7x7 (224 px) cells; the demo's 32 px images use 4x4.
MIN_MASK_CELLS = 4


def default_mask_patch_size(encoder_config: PretrainedConfig) -> int:
    """32 px as in the paper when the image allows it, else the coarsest cell that tiles the image with at least
    `MIN_MASK_CELLS` cells per side (a 32 px image in 32 px cells would be masked whole), a multiple of the patch."""
    height, width = to_pair(encoder_config.image_size)
    patch = to_pair(encoder_config.patch_size)[0]
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
            encoder_config = _encoder_config_from_dict(model_type, encoder_config)
        if encoder_config.model_type not in SUPPORTED_ENCODERS:
            raise ValueError(
                f"encoder_config: unknown encoder type {encoder_config.model_type!r}; supported: {SUPPORTED_ENCODERS}"
            )
        changes: dict[str, Any] = {}
        if image_size is not None:
            changes["image_size"] = list(image_size) if isinstance(image_size, (list, tuple)) else int(image_size)
        if num_channels is not None:
            changes["num_channels"] = int(num_channels)
        # The encoder must carry a mask token (BEiT reads this from its config; ViT/Swin take a constructor flag).
        if encoder_config.model_type == "beit":
            changes["use_mask_token"] = True
        changes = {
            key: value for key, value in changes.items() if _plain(getattr(encoder_config, key)) != _plain(value)
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

    def _validate_windows(self, height: int, width: int) -> None:
        """transformers' Swin uses one `window_size` for every stage and fails in the forward pass on a stage whose
        grid is smaller than the window (the official code shrinks that stage's window instead, e.g. Swin-L at 192 px
        with window 12: stage 4 is 6x6). Refuse such a config here, naming the field."""
        encoder = self.encoder_config
        if not is_hierarchical(encoder.model_type):
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
            if name == "demo":
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
