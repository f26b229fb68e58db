"""Official microsoft/SimMIM checkpoints in: pretraining checkpoints (encoder + decoder) become a
`SimMIMForMaskedImageModeling`, fine-tuned ones a stock `BeitForImageClassification` / `SwinForImageClassification`.

Official checkpoints are `torch.save` pickles of `{"model": state_dict, "optimizer": ..., "config": <yacs CfgNode>,
...}`. They are read by a restricted unpickler that never executes pickled code: tensors, plain containers and a few
value types are rebuilt, the yacs `CfgNode` is read as a plain dict (`OfficialConfigNode`; yacs is never imported),
and any other global is refused with an error that names it.

The architecture is read from the tensors wherever they determine it (width, depth, MLP width, patch size, heads from
the relative position tables, window size from the table size, image size from the relative position index / the
shifted-window attention masks / the position embeddings, shared or per-block tables, layer scale, pooling); the
rest (and the heads of a ViT without tables) comes from the checkpoint's own config, then `overrides`, then the
preset. A value given in `overrides` that contradicts a tensor is an error naming the tensor.

Key layout (official -> transformers, in memory): ViT (BEiT-style) `patch_embed.proj` -> `embeddings.
patch_embeddings.projection`, `cls_token`/`mask_token`/`pos_embed` -> `embeddings.*`, `rel_pos_bias.
relative_position_bias_table` -> `shared_position_bias.*`, `blocks.N.norm1/norm2` -> `layers.N.layernorm_before/
after`, `blocks.N.attn.qkv.weight` ([q; k; v]) -> `q_proj`/`k_proj`/`v_proj`, `q_bias`/`v_bias` -> `q_proj.bias`/
`v_proj.bias` (BEiT has no key bias), `attn.proj` -> `attention.o_proj`, `gamma_1/2` -> `lambda_1/2`, `norm` ->
`layernorm`, `fc_norm` -> `pooler.layernorm`, `head` -> `classifier`. Swin: `patch_embed.norm` -> `embeddings.norm`,
`layers.S.blocks.B.*` -> `encoder.layers.S.blocks.B.*` (same renames, qkv with bias, tables under
`attention.relative_position_bias`), `layers.S.downsample.*` -> `encoder.layers.S.downsample.*`. Index buffers and
attention masks are checked (ViT index) or used for the image size, then dropped (transformers recomputes them).
"""

from __future__ import annotations

import argparse
import collections
import copy
import io
import json
import math
import os
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from simmim_hf.cli import parse_overrides, parse_script_arguments
from simmim_hf.configuration_simmim import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SimMIMConfig,
    _preset_encoders,
    plain_value,
)
from simmim_hf.errors import UsageError
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling

# The preset an official checkpoint of each family starts from (for what the tensors do not determine).
DEFAULT_PRESETS = {"vit": "beit-base-patch16-224", "swin": "swin-base-window6-192"}


class OfficialCheckpointError(UsageError):
    """An official checkpoint that cannot be read or converted; the message names the tensor or global."""


class OfficialConfigNode(dict):
    """A yacs `CfgNode` from an official checkpoint, read as plain data (keys also readable as attributes)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts (JSON-friendly where the values are)."""
        return {
            key: value.to_dict() if isinstance(value, OfficialConfigNode) else value for key, value in self.items()
        }


# --------------------------------------------------------------------------------------------- restricted loading


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object for every global a checkpoint may reference. Each one only rebuilds data."""
    import torch._utils

    allowed: dict[tuple[str, str], Any] = {
        ("yacs.config", "CfgNode"): OfficialConfigNode,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _codecs_encode,  # protocol 2 writes bytes as _codecs.encode(str, "latin1")
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "Tensor"): torch.Tensor,
        ("torch.nn.parameter", "Parameter"): nn.Parameter,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    try:
        import numpy as np

        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(module, "scalar")] = _numpy_scalar
        allowed[("numpy", "dtype")] = np.dtype
        for dtype_name in ("Float64DType", "Float32DType", "Float16DType", "Int64DType", "Int32DType", "BoolDType"):
            if hasattr(np, "dtypes") and hasattr(np.dtypes, dtype_name):
                allowed[("numpy.dtypes", dtype_name)] = getattr(np.dtypes, dtype_name)
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    return allowed


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_scalar(dtype: Any, data: bytes | None = None) -> Any:
    """numpy scalars of numeric dtypes only (an object dtype would carry an arbitrary object)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError(f"refusing a numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype)[0]


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler whose globals come from `_allowed_globals()` only; nothing is imported."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _RestrictedUnpickler._allowed is None:
            _RestrictedUnpickler._allowed = _allowed_globals()
        try:
            return _RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise OfficialCheckpointError(
                f"refusing to load the pickled global {module}.{name}: an official SimMIM checkpoint holds only "
                "tensors, plain containers and a yacs CfgNode, and this loader never executes pickled code"
            ) from None


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load's `pickle_module`: torch wraps `Unpickler` (its wrapper resolves storage types itself and defers every
# other global to `find_class` above) and calls `load` for the legacy (non-zip) format.
_restricted_pickle = types.ModuleType("simmim_hf_restricted_pickle")
_restricted_pickle.Unpickler = _RestrictedUnpickler
_restricted_pickle.load = _restricted_load
_restricted_pickle.UnpicklingError = pickle.UnpicklingError
_restricted_pickle.__name__ = "simmim_hf_restricted_pickle"


def load_official_checkpoint(path: str | os.PathLike | io.BytesIO) -> Any:
    """The unpickled checkpoint (tensors on CPU), read without executing pickled code.

    Raises `OfficialCheckpointError` naming any global outside the allowlist (e.g. `posix.system`).
    """
    if not isinstance(path, io.BytesIO) and not Path(path).is_file():
        raise OfficialCheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle)
    except OfficialCheckpointError as error:
        raise OfficialCheckpointError(f"{path}: {error}") from None


# ----------------------------------------------------------------------------------------- architecture reading


def split_checkpoint(checkpoint: Any) -> tuple[dict[str, torch.Tensor], OfficialConfigNode | dict | None]:
    """`(state_dict, config)` of a loaded checkpoint (`{"model": ..., "config": ...}`) or of a bare state dict."""
    if isinstance(checkpoint, dict) and "model" in checkpoint and isinstance(checkpoint["model"], dict):
        state, config = checkpoint["model"], checkpoint.get("config")
    elif isinstance(checkpoint, dict):
        state, config = checkpoint, None
    else:
        raise OfficialCheckpointError(f"expected a checkpoint dict or a state dict, got {type(checkpoint).__name__}")
    bad = [key for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise OfficialCheckpointError(f"state dict entry {bad[0]!r} is not a tensor")
    return dict(state), config if isinstance(config, dict) else None


def _config_value(config: dict | None, *path: str) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def checkpoint_kind(state: dict[str, torch.Tensor]) -> tuple[str, str]:
    """`(family, kind)`: family "vit" or "swin", kind "pretraining" (`encoder.*` + `decoder.*`) or "finetuned"."""
    keys = set(state)
    kind = "pretraining" if any(k.startswith("encoder.") for k in keys) else "finetuned"
    prefix = "encoder." if kind == "pretraining" else ""
    if f"{prefix}layers.0.blocks.0.attn.qkv.weight" in keys:
        family = "swin"
    elif f"{prefix}blocks.0.attn.qkv.weight" in keys:
        family = "vit"
    else:
        raise OfficialCheckpointError(
            f"not an official SimMIM ViT or Swin state dict: no {prefix}blocks.0.attn.qkv.weight or "
            f"{prefix}layers.0.blocks.0.attn.qkv.weight tensor"
        )
    if kind == "pretraining" and "decoder.0.weight" not in keys:
        raise OfficialCheckpointError("pretraining checkpoint without its decoder: no decoder.0.weight tensor")
    return family, kind


def _count(keys: set[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise OfficialCheckpointError(f"blocks are not numbered 0..n-1: {sorted(found)} (pattern {pattern})")
    return len(found)


def _grid_from_table(rows: int, extra: int, name: str) -> int:
    """Window side w from a table of (2w - 1)^2 + extra rows."""
    side = math.isqrt(rows - extra)
    if side * side != rows - extra or side % 2 == 0:
        raise OfficialCheckpointError(f"{name}: {rows} rows is not (2w - 1)^2 + {extra} for any window w")
    return (side + 1) // 2


class _Derived(dict):
    """Architecture values read from tensors, each remembering the tensor it came from."""

    def __init__(self) -> None:
        super().__init__()
        self.source: dict[str, str] = {}

    def put(self, key: str, value: Any, tensor: str) -> None:
        if key in self and self[key] != value:
            raise OfficialCheckpointError(
                f"{tensor} implies {key}={value}, but {self.source[key]} implies {key}={self[key]}"
            )
        if key not in self:
            self[key], self.source[key] = value, tensor


def _read_vit(state: dict[str, torch.Tensor], prefix: str) -> _Derived:
    keys = set(state)
    d = _Derived()
    name = f"{prefix}patch_embed.proj.weight"
    if name not in state:
        raise OfficialCheckpointError(f"missing tensor {name}")
    width, channels, patch, _ = state[name].shape
    d.put("hidden_size", int(width), name)
    d.put("num_channels", int(channels), name)
    d.put("patch_size", int(patch), name)
    d.put("num_hidden_layers", _count(keys, rf"{re.escape(prefix)}blocks\.(\d+)\."), f"{prefix}blocks.*")
    name = f"{prefix}blocks.0.mlp.fc1.weight"
    d.put("intermediate_size", int(state[name].shape[0]), name)
    shared = f"{prefix}rel_pos_bias.relative_position_bias_table"
    block = f"{prefix}blocks.0.attn.relative_position_bias_table"
    d.put("use_shared_relative_position_bias", shared in keys, shared)
    d.put("use_relative_position_bias", block in keys, block)
    for table in (shared, block):
        if table in keys:
            rows, heads = state[table].shape
            d.put("num_attention_heads", int(heads), table)
            grid = _grid_from_table(int(rows), 3, table)
            d.put("image_size", grid * int(patch), table)
    for index in (f"{prefix}rel_pos_bias.relative_position_index", f"{prefix}blocks.0.attn.relative_position_index"):
        if index in keys:
            grid = math.isqrt(state[index].shape[0] - 1)
            d.put("image_size", grid * int(patch), index)
    name = f"{prefix}pos_embed"
    d.put("use_absolute_position_embeddings", name in keys, name)
    if name in keys:
        d.put("image_size", math.isqrt(state[name].shape[1] - 1) * int(patch), name)
    name = f"{prefix}blocks.0.gamma_1"
    d.put("layer_scale", name in keys, name)
    name = f"{prefix}fc_norm.weight"
    d.put("use_mean_pooling", name in keys, name)
    return d


def _read_swin(state: dict[str, torch.Tensor], prefix: str) -> _Derived:
    keys = set(state)
    d = _Derived()
    name = f"{prefix}patch_embed.proj.weight"
    if name not in state:
        raise OfficialCheckpointError(f"missing tensor {name}")
    if f"{prefix}patch_embed.norm.weight" not in keys:
        raise OfficialCheckpointError(
            f"missing tensor {prefix}patch_embed.norm.weight: transformers' Swin always normalises the patch "
            "embedding (PATCH_NORM True)"
        )
    embed_dim, channels, patch, _ = state[name].shape
    d.put("embed_dim", int(embed_dim), name)
    d.put("num_channels", int(channels), name)
    d.put("patch_size", int(patch), name)
    stages = _count(keys, rf"{re.escape(prefix)}layers\.(\d+)\.")
    depths, heads = [], []
    window = None
    for stage in range(stages):
        depths.append(_count(keys, rf"{re.escape(prefix)}layers\.{stage}\.blocks\.(\d+)\."))
        table = f"{prefix}layers.{stage}.blocks.0.attn.relative_position_bias_table"
        rows, stage_heads = state[table].shape
        heads.append(int(stage_heads))
        stage_window = _grid_from_table(int(rows), 0, table)
        if window is None:
            window = stage_window
            d.put("window_size", stage_window, table)
        elif stage_window != window:
            raise OfficialCheckpointError(
                f"{table}: stage {stage} attends in {stage_window}x{stage_window} windows (the official code shrinks "
                f"the window to a stage smaller than it) but stage 0 in {window}x{window}; transformers' Swin uses one "
                "window size in every stage and cannot hold this model"
            )
        for block in range(depths[-1]):
            mask = f"{prefix}layers.{stage}.blocks.{block}.attn_mask"
            if mask in keys:
                side = math.isqrt(state[mask].shape[0]) * window
                d.put("image_size", side * int(patch) * 2**stage, mask)
    d.put("depths", depths, f"{prefix}layers.*.blocks.*")
    d.put("num_heads", heads, f"{prefix}layers.*.blocks.0.attn.relative_position_bias_table")
    name = f"{prefix}layers.0.blocks.0.mlp.fc1.weight"
    d.put("mlp_ratio", state[name].shape[0] / embed_dim, name)
    name = f"{prefix}layers.0.blocks.0.attn.qkv.bias"
    d.put("qkv_bias", name in keys, name)
    name = f"{prefix}absolute_pos_embed"
    d.put("use_absolute_embeddings", name in keys, name)
    if name in keys:
        d.put("image_size", math.isqrt(state[name].shape[1]) * int(patch), name)
    return d


def official_configs(
    state: dict[str, torch.Tensor],
    config: dict | None = None,
    preset: str | None = None,
    **overrides: Any,
) -> tuple[str, str, SimMIMConfig]:
    """`(family, kind, simmim_config)` for an official state dict.

    Tensors decide what they determine; then `overrides`, the checkpoint's own (yacs) config, then the preset. The
    merged values go through `SimMIMConfig.from_preset`, the override path of every other start, so a field that is
    unknown or derived (Swin's `hidden_size`: set `embed_dim`) is refused the same way, naming it.
    """
    family, kind = checkpoint_kind(state)
    prefix = "encoder." if kind == "pretraining" else ""
    derived = _read_vit(state, prefix) if family == "vit" else _read_swin(state, prefix)
    preset = preset or DEFAULT_PRESETS[family]
    presets = _preset_encoders()
    if preset not in presets:
        raise OfficialCheckpointError(f"preset: unknown preset {preset!r}; available: {list(presets)}")
    encoder_config = presets[preset][0]
    expected_type = "beit" if family == "vit" else "swin"
    if encoder_config.model_type != expected_type:
        raise OfficialCheckpointError(
            f"preset {preset!r} is a {encoder_config.model_type} encoder, but the checkpoint is an official "
            f"{family} (needs a {expected_type} preset, e.g. {DEFAULT_PRESETS[family]!r})"
        )
    values: dict[str, Any] = {}
    # The checkpoint's own config (yacs, read as data) for what the tensors leave open.
    model_type = _config_value(config, "MODEL", "TYPE")
    if model_type is not None and str(model_type) != family:
        raise OfficialCheckpointError(f"config MODEL.TYPE={model_type!r} but the tensors are an official {family}")
    image_size = _config_value(config, "DATA", "IMG_SIZE")
    if image_size is not None:
        values["image_size"] = int(image_size)
    drop_path = _config_value(config, "MODEL", "DROP_PATH_RATE")
    if drop_path is not None:
        values["drop_path_rate"] = float(drop_path)
    heads = _config_value(config, "MODEL", "VIT" if family == "vit" else "SWIN", "NUM_HEADS")
    if heads is not None:
        values["num_attention_heads" if family == "vit" else "num_heads"] = heads
    for key, path in (("mask_patch_size", "MASK_PATCH_SIZE"), ("mask_ratio", "MASK_RATIO")):
        value = _config_value(config, "DATA", path)
        if value is not None:
            values[key] = value
    values.update(overrides)
    # Tensors win over the config and the preset; an explicit override that contradicts one is an error.
    for key, value in derived.items():
        if key in overrides and plain_value(overrides[key]) != plain_value(value):
            raise OfficialCheckpointError(
                f"{key}={overrides[key]!r} contradicts tensor {derived.source[key]}, which implies {key}={value!r}"
            )
        if key in values and key not in overrides and plain_value(values[key]) != plain_value(value):
            raise OfficialCheckpointError(
                f"the checkpoint's config says {key}={values[key]!r} but tensor {derived.source[key]} implies "
                f"{value!r}"
            )
        values[key] = value
    if family == "vit":
        layer_scale = values.pop("layer_scale")
        if not layer_scale:
            values["layer_scale_init_value"] = 0.0
        elif not getattr(encoder_config, "layer_scale_init_value", 0.0):
            values["layer_scale_init_value"] = 0.1
    simmim_config = SimMIMConfig.from_preset(preset, **values)
    encoder_config = simmim_config.encoder_config
    if family == "vit" and encoder_config.hidden_size % encoder_config.num_attention_heads:
        raise OfficialCheckpointError(
            f"num_attention_heads={encoder_config.num_attention_heads} does not divide the width "
            f"{encoder_config.hidden_size} (tensor {derived.source['hidden_size']}); pass num_attention_heads=..."
        )
    return family, kind, simmim_config


# -------------------------------------------------------------------------------------------------- key mapping


# Tensors every official transformer block has (ViT/BEiT and Swin alike), by block-relative name.
_BLOCK_RENAMES = {
    "norm1.weight": "layernorm_before.weight",
    "norm1.bias": "layernorm_before.bias",
    "norm2.weight": "layernorm_after.weight",
    "norm2.bias": "layernorm_after.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_VIT_BLOCK_RENAMES = {
    **_BLOCK_RENAMES,
    "attn.q_bias": "attention.q_proj.bias",
    "attn.v_bias": "attention.v_proj.bias",
    "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table",
    "gamma_1": "lambda_1",
    "gamma_2": "lambda_2",
}
_SWIN_BLOCK_RENAMES = {
    **_BLOCK_RENAMES,
    "attn.relative_position_bias_table": "attention.relative_position_bias.relative_position_bias_table",
}


def _map_block(block: str, rest: str, tensor: torch.Tensor, renames: dict[str, str], out: dict) -> bool:
    """Adds the transformers tensors for the official block tensor `rest` under the transformers prefix `block`: a
    rename from `renames`, or the fused `attn.qkv.weight` (3 * dim, dim) / `attn.qkv.bias` (3 * dim,) split into
    q/k/v parts of (dim, dim) / (dim,) each; False if neither."""
    if rest in renames:
        out[block + renames[rest]] = tensor
        return True
    if rest in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        for part, chunk in zip("qkv", tensor.chunk(3, dim=0), strict=True):
            out[f"{block}attention.{part}_proj.{kind}"] = chunk.clone()
        return True
    return False


def _map_vit(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Adds the transformers tensors for one official ViT tensor (encoder-relative names); False if unknown."""
    simple = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "cls_token": "embeddings.cls_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "rel_pos_bias.relative_position_bias_table": "shared_position_bias.relative_position_bias_table",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
        "fc_norm.weight": "pooler.layernorm.weight",
        "fc_norm.bias": "pooler.layernorm.bias",
    }
    if name in simple:
        out[simple[name]] = tensor
        return True
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None:
        return False
    block, rest = f"layers.{match.group(1)}.", match.group(2)
    if rest == "attn.qkv.bias":  # a full qkv bias: BEiT has no key bias, so it must be zero (Swin keeps all three)
        q, k, v = tensor.chunk(3, dim=0)
        if k.abs().max() > 0:
            raise OfficialCheckpointError(
                f"{name}: nonzero key bias, which transformers' BEiT (query and value biases only) cannot hold"
            )
        out[f"{block}attention.q_proj.bias"], out[f"{block}attention.v_proj.bias"] = q.clone(), v.clone()
        return True
    return _map_block(block, rest, tensor, _VIT_BLOCK_RENAMES, out)


def _map_swin(name: str, tensor: torch.Tensor, out: dict[str, torch.Tensor]) -> bool:
    """Adds the transformers tensors for one official Swin tensor (encoder-relative names); False if unknown."""
    simple = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "patch_embed.norm.weight": "embeddings.norm.weight",
        "patch_embed.norm.bias": "embeddings.norm.bias",
        "mask_token": "embeddings.mask_token",
        "absolute_pos_embed": "embeddings.position_embeddings",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    if name in simple:
        out[simple[name]] = tensor
        return True
    match = re.fullmatch(r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)", name)
    if match is not None:
        out[f"encoder.layers.{match.group(1)}.downsample.{match.group(2)}"] = tensor
        return True
    match = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", name)
    if match is None:
        return False
    block, rest = f"encoder.layers.{match.group(1)}.blocks.{match.group(2)}.", match.group(3)
    return _map_block(block, rest, tensor, _SWIN_BLOCK_RENAMES, out)


# Buffers of the official models that transformers recomputes.
_DROPPED = re.compile(r"(?:^|\.)(?:relative_position_index|attn_mask)$")


def _check_vit_index(state: dict[str, torch.Tensor], prefix: str, image_size: int, patch: int) -> None:
    from transformers.models.beit.modeling_beit import BeitRelativePositionBias

    grid = image_size // patch
    expected = BeitRelativePositionBias.generate_relative_position_index((grid, grid))
    for name, tensor in state.items():
        if name.startswith(prefix) and name.endswith("relative_position_index"):
            if tensor.shape != expected.shape or not torch.equal(tensor.long(), expected.long()):
                raise OfficialCheckpointError(
                    f"{name}: not the relative position index of a {grid}x{grid} grid with a CLS token, which "
                    "transformers' BEiT recomputes"
                )


def convert_state_dict(
    state: dict[str, torch.Tensor], family: str, kind: str, target: dict[str, torch.Tensor], encoder_prefix: str
) -> dict[str, torch.Tensor]:
    """The official state dict in the target model's names, checked key by key and shape by shape against
    `target` (the target model's own state dict). Errors name the official tensor."""
    prefix = "encoder." if kind == "pretraining" else ""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, tensor in state.items():
        if _DROPPED.search(name):
            continue
        if kind == "pretraining" and name.startswith("decoder."):
            mapped = {name: tensor}
        elif kind == "finetuned" and name.startswith("head."):
            mapped = {"classifier." + name[len("head.") :]: tensor}
        elif name.startswith(prefix):
            encoder_out: dict[str, torch.Tensor] = {}
            local = name[len(prefix) :]
            known = _map_vit(local, tensor, encoder_out) if family == "vit" else _map_swin(local, tensor, encoder_out)
            if not known:
                raise OfficialCheckpointError(f"unexpected tensor {name}: not part of the official {family} layout")
            mapped = {encoder_prefix + key: value for key, value in encoder_out.items()}
        else:
            raise OfficialCheckpointError(f"unexpected tensor {name}: not part of the official {family} layout")
        for key, value in mapped.items():
            if key not in target:
                raise OfficialCheckpointError(
                    f"tensor {name} has no place in the converted model (no {key}); check the preset/overrides"
                )
            if tuple(value.shape) != tuple(target[key].shape):
                raise OfficialCheckpointError(
                    f"tensor {name} has shape {tuple(value.shape)} but the converted model's {key} has "
                    f"{tuple(target[key].shape)}"
                )
            out[key], origin[key] = value.to(target[key].dtype), name
    missing = [key for key in target if key not in out]
    if missing:
        raise OfficialCheckpointError(
            f"the checkpoint has no tensor for {missing[0]} ({len(missing)} missing in all); "
            "the preset/overrides describe a different architecture"
        )
    return out


# ---------------------------------------------------------------------------------------------------- entry points


def _load(path_or_state_dict: Any) -> tuple[dict[str, torch.Tensor], dict | None]:
    if isinstance(path_or_state_dict, (str, os.PathLike, io.BytesIO)):
        return split_checkpoint(load_official_checkpoint(path_or_state_dict))
    return split_checkpoint(path_or_state_dict)


def from_official(
    path_or_state_dict: str | os.PathLike | dict[str, Any], preset: str | None = None, **overrides: Any
) -> SimMIMForMaskedImageModeling:
    """An official SimMIM *pretraining* checkpoint (file path, loaded checkpoint dict or bare state dict) as a
    `SimMIMForMaskedImageModeling` with the same encoder and decoder: same loss and reconstruction for the same
    image and mask. `preset` and `overrides` (SimMIMConfig or encoder fields) fill in what the tensors and the
    checkpoint's config leave open. For a fine-tuned checkpoint use `official_classifier`."""
    state, config = _load(path_or_state_dict)
    family, kind, simmim_config = official_configs(state, config, preset, **overrides)
    encoder_config = simmim_config.encoder_config
    if kind != "pretraining":
        raise OfficialCheckpointError(
            "this is a fine-tuned official checkpoint (no encoder./decoder. tensors); use official_classifier or "
            "scripts/convert_official.py, which write a stock image classifier"
        )
    decoder = state["decoder.0.weight"]
    if decoder.shape[0] != simmim_config.encoder_stride**2 * simmim_config.num_channels:
        raise OfficialCheckpointError(
            f"decoder.0.weight has {decoder.shape[0]} output channels, but encoder_stride={simmim_config.encoder_stride}"
            f" and {simmim_config.num_channels} channels need {simmim_config.encoder_stride**2 * simmim_config.num_channels}"
        )
    model = SimMIMForMaskedImageModeling(simmim_config)
    if family == "vit":
        _check_vit_index(state, "encoder.", int(encoder_config.image_size), int(encoder_config.patch_size))
    target = model.state_dict()
    converted = convert_state_dict(state, family, kind, target, encoder_prefix="simmim.encoder.")
    model.load_state_dict(converted, strict=True)
    return model


def official_classifier(
    path_or_state_dict: str | os.PathLike | dict[str, Any], preset: str | None = None, **overrides: Any
) -> nn.Module:
    """An official SimMIM *fine-tuned* checkpoint as a stock `BeitForImageClassification` (ViT) or
    `SwinForImageClassification` with the same weights (classifier included)."""
    from transformers import AutoModelForImageClassification

    state, config = _load(path_or_state_dict)
    family, kind, simmim_config = official_configs(state, config, preset, **overrides)
    if kind != "finetuned":
        raise OfficialCheckpointError(
            "this is a pretraining checkpoint (encoder./decoder. tensors); use from_official"
        )
    if "head.weight" not in state:
        raise OfficialCheckpointError("fine-tuned checkpoint without a classifier: no head.weight tensor")
    encoder_config = copy.deepcopy(simmim_config.encoder_config)
    encoder_config.num_labels = int(state["head.weight"].shape[0])
    if family == "vit":
        encoder_config.use_mask_token = False
    model = AutoModelForImageClassification.from_config(encoder_config)
    if family == "vit":
        _check_vit_index(state, "", int(encoder_config.image_size), int(encoder_config.patch_size))
    encoder_prefix = "beit." if family == "vit" else "swin."
    target = model.state_dict()
    converted = convert_state_dict(state, family, kind, target, encoder_prefix=encoder_prefix)
    model.load_state_dict(converted, strict=True)
    return model


def convert_official(
    path_or_state_dict: str | os.PathLike | dict[str, Any],
    output_dir: str | os.PathLike,
    preset: str | None = None,
    **overrides: Any,
) -> Path:
    """Writes an official checkpoint as Hugging Face folders into `output_dir`.

    Pretraining checkpoint: a SimMIM checkpoint (continue pretraining with `--model_name_or_path output_dir`) plus
    the stock encoder in `output_dir/encoder` (`export_encoder`). Fine-tuned checkpoint: a stock image classifier
    with its image processor. Either way also `official_config.json`, the checkpoint's own config as data.
    """
    from simmim_hf.publish.convert import export_encoder, image_processor_for
    from simmim_hf.publish.run_dir import RunDir

    state, config = _load(path_or_state_dict)
    family, kind = checkpoint_kind(state)
    output_dir = Path(output_dir)
    if kind == "pretraining":
        model = from_official(state if config is None else {"model": state, "config": config}, preset, **overrides)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        image_processor_for(model.config).save_pretrained(output_dir)
        export_encoder(model, RunDir(output_dir).encoder)
    else:
        model = official_classifier(
            state if config is None else {"model": state, "config": config}, preset, **overrides
        )
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        stats = types.SimpleNamespace(
            image_size=model.config.image_size,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            num_channels=model.config.num_channels,
        )
        image_processor_for(stats).save_pretrained(output_dir)
    if config is not None:
        text = json.dumps(plain_value(config), indent=2, sort_keys=True, default=str)
        (output_dir / "official_config.json").write_text(text + "\n")
    return output_dir


__all__ = [
    "OfficialCheckpointError",
    "OfficialConfigNode",
    "convert_official",
    "from_official",
    "load_official_checkpoint",
    "official_classifier",
    "official_configs",
]


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """`scripts/convert_official.py`'s arguments (also from `--config FILE`, the positional checkpoint included)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official .pth file (pretraining or fine-tuned)")
    parser.add_argument("--output_dir", required=True, help="folder to write (must not exist or be empty)")
    parser.add_argument("--preset", default=None, help="preset for what the tensors do not determine")
    parser.add_argument(
        "--config_overrides", default=None, help='"key=value,..." SimMIM or encoder fields (JSON values)'
    )
    return parse_script_arguments(parser, argv)


def main(argv: list[str] | None = None, description: str | None = None) -> int:
    """`scripts/convert_official.py`: converts, or prints one `error: ...` line and returns 2 having written
    nothing (unreadable checkpoint, contradicting overrides, a bad config file, a non-empty --output_dir)."""
    try:
        args = parse_args(argv, description)
        output_dir = Path(args.output_dir)
        if output_dir.exists() and any(output_dir.iterdir()):
            raise UsageError(f"--output_dir {output_dir}: exists and is not empty")
        overrides = parse_overrides(args.config_overrides)
        # Everything is read and checked in memory before the first file is written.
        convert_official(args.checkpoint, output_dir, preset=args.preset, **overrides)
    except (UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output_dir}")
    return 0
