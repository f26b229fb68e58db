"""Masking inside a stock ConvNet encoder (ConvNeXt, ConvNeXt V2, ResNet), with forward hooks: no module is replaced,
so every parameter keeps its stock name and export stays a key strip.

Two modes, chosen by `SimMIMConfig.conv_masking`:

- "sparse" (SparK, ConvNeXt V2's FCMAE as masked dense convolution): the caller zeroes masked pixels; the keep-mask,
  at each feature map's resolution, is multiplied into the output of every convolution (stem, depthwise/spatial,
  downsampling, shortcut), every channels-first LayerNorm, the stem and every block; ResNet's max-pool sees masked
  positions as -inf (so a zero there never wins over negative visible values); GRN's input is masked, so its
  L2 statistics cover visible positions only; BatchNorm normalises with the mean and variance of visible positions
  (and updates its running statistics with them). Features at visible positions then do not depend on masked pixels,
  and are exactly zero at masked positions, at every stage.
- "token" (SimMIM's own): the learnable mask token replaces masked positions of the stem output; dense after that.

The mask is held by a `MaskState` for the duration of one forward pass (`MaskState.active`); outside it every hook
is a no-op, so the same encoder runs unmasked (features, evaluation) unchanged.

Hub remote code: imports only torch and transformers (it travels beside `modeling_simmim.py`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

# Stem and blocks of the stock ConvNets, by module name.
_STEMS = ("embeddings", "embedder")
_BLOCK = re.compile(r"^encoder\.stages\.\d+\.layers\.\d+$")


class MaskState:
    """The keep-mask of the forward pass in progress: `keep` `(N, 1, H, W)` bool at pixel resolution (True =
    visible), or None outside a masked pass; `mode` "sparse" or "token"; `mask_token` `(C,)` in token mode."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None
        self.mode: str | None = None
        self.mask_token: torch.Tensor | None = None
        self._cache: dict[tuple[int, int, torch.dtype], torch.Tensor] = {}

    @contextlib.contextmanager
    def active(
        self, keep: torch.Tensor | None, mode: str, mask_token: torch.Tensor | None = None
    ) -> Iterator[MaskState]:
        """Hooks read `keep` (`(N, 1, H, W)` bool, True = visible) while the block runs; None: unmasked."""
        self.keep, self.mode, self.mask_token, self._cache = keep, mode, mask_token, {}
        try:
            yield self
        finally:
            self.keep, self.mode, self.mask_token, self._cache = None, None, None, {}

    def sparse(self) -> bool:
        return self.keep is not None and self.mode == "sparse"

    def keep_at(self, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        """The keep-mask at a `height x width` feature map, `(N, 1, height, width)` in `dtype` (1 = visible).

        Mask cells are multiples of the encoder's output stride, so each position of every feature map lies in one
        cell: sampling the pixel mask at the position's first pixel is exact."""
        key = (height, width, dtype)
        if key not in self._cache:
            keep = self.keep
            factor = keep.shape[-2] // height
            if factor * height != keep.shape[-2] or factor * width != keep.shape[-1]:
                raise ValueError(
                    f"a {height}x{width} feature map does not tile the {keep.shape[-2]}x{keep.shape[-1]} image"
                )
            self._cache[key] = keep[:, :, ::factor, ::factor].to(dtype)
        return self._cache[key]


class _MaskOutput:
    """Forward hook: output x keep-mask (`(N, C, h, w)`, or `(N, h, w, C)` with `channels_last`)."""

    def __init__(self, state: MaskState, channels_last: bool = False) -> None:
        self.state, self.channels_last = state, channels_last

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.state.sparse():
            return None
        if self.channels_last:
            keep = self.state.keep_at(output.shape[1], output.shape[2], output.dtype)
            return output * keep.permute(0, 2, 3, 1)
        return output * self.state.keep_at(output.shape[-2], output.shape[-1], output.dtype)


class _MaskInput:
    """Forward pre-hook: input x keep-mask (GRN's channels-last input: its L2 norm then covers visible positions)."""

    def __init__(self, state: MaskState, channels_last: bool = False) -> None:
        self.state, self.channels_last = state, channels_last

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.state.sparse():
            return None
        features = args[0]
        if self.channels_last:
            keep = self.state.keep_at(features.shape[1], features.shape[2], features.dtype).permute(0, 2, 3, 1)
        else:
            keep = self.state.keep_at(features.shape[-2], features.shape[-1], features.dtype)
        return (features * keep, *args[1:])


class _MaxPoolInput:
    """Forward pre-hook of a max-pool: masked positions become -inf, so they never win a window (its output hook
    zeroes them again; every window centred on a visible position holds that visible position)."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.state.sparse():
            return None
        features = args[0]
        keep = self.state.keep_at(features.shape[-2], features.shape[-1], features.dtype)
        return (features.masked_fill(keep == 0, float("-inf")), *args[1:])


class _MaskPooledOutput:
    """Forward hook of a max-pool: masked positions (-inf) back to exactly 0."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if not self.state.sparse():
            return None
        keep = self.state.keep_at(output.shape[-2], output.shape[-1], output.dtype)
        return torch.where(keep > 0, output, torch.zeros((), dtype=output.dtype, device=output.device))


class _MaskTokenAtStem:
    """Forward hook of the stem in token mode: `x * (1 - m) + mask_token * m`, m = 1 at masked positions."""

    def __init__(self, state: MaskState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        state = self.state
        if state.keep is None or state.mode != "token":
            return None
        masked = 1.0 - state.keep_at(output.shape[-2], output.shape[-1], output.dtype)
        token = state.mask_token.to(output.dtype).view(1, -1, 1, 1)
        return output * (1.0 - masked) + token * masked


def visible_batch_norm(module: nn.BatchNorm2d, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """BatchNorm over visible positions only (SparK's sparse BatchNorm, densely): in training, the mean and the biased
    variance of the positions where `keep` is 1 normalise, and the running statistics move towards that mean and the
    unbiased variance (PyTorch's rule, momentum or cumulative average); in evaluation the running statistics.
    Masked positions of the result are 0. Statistics are computed in float32 whatever the input's dtype (as cuDNN's
    BatchNorm does under autocast); the result has the input's dtype.

    features: (N, C, h, w); keep: (N, 1, h, w), 1 = visible. Returns (N, C, h, w).
    """
    dtype = features.dtype
    features, keep = features.float(), keep.float()
    use_batch = module.training or not module.track_running_stats
    if use_batch:
        count = keep.sum()
        mean = (features * keep).sum(dim=(0, 2, 3)) / count
        centred = (features - mean.view(1, -1, 1, 1)) * keep
        var = (centred * centred).sum(dim=(0, 2, 3)) / count
        if module.training and module.track_running_stats:
            with torch.no_grad():
                module.num_batches_tracked.add_(1)
                momentum = module.momentum
                if momentum is None:
                    momentum = 1.0 / float(module.num_batches_tracked)
                unbiased = var * count / (count - 1).clamp(min=1)
                module.running_mean.mul_(1 - momentum).add_(
                    mean.detach().to(module.running_mean.dtype), alpha=momentum
                )
                module.running_var.mul_(1 - momentum).add_(
                    unbiased.detach().to(module.running_var.dtype), alpha=momentum
                )
    else:
        mean, var = module.running_mean.float(), module.running_var.float()
    normed = (features - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + module.eps)
    if module.affine:
        normed = normed * module.weight.float().view(1, -1, 1, 1) + module.bias.float().view(1, -1, 1, 1)
    return (normed * keep).to(dtype)


class SparseBatchNorm2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` whose statistics, inside a sparse pass, come from visible positions only
    (`visible_batch_norm`); the stock BatchNorm otherwise. Installed by changing the class of the encoder's own
    BatchNorm modules (`install`), so parameter and buffer names stay the stock ones."""

    _mask_state: MaskState

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        state = getattr(self, "_mask_state", None)
        if state is None or not state.sparse():
            return super().forward(features)
        keep = state.keep_at(features.shape[-2], features.shape[-1], features.dtype)
        return visible_batch_norm(self, features, keep)


def _is_channels_first_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and getattr(module, "data_format", None) == "channels_first"


def install(encoder: nn.Module, state: MaskState) -> None:
    """Registers the hooks of both modes on a stock `ConvNextModel`, `ConvNextV2Model` or `ResNetModel` (see the
    module docstring); they read `state`. Names, parameters and buffers are unchanged."""
    stems = [name for name in _STEMS if isinstance(getattr(encoder, name, None), nn.Module)]
    if len(stems) != 1:
        raise ValueError(f"{type(encoder).__name__}: no ConvNet stem ({' or '.join(_STEMS)}) to mask")
    for name, module in encoder.named_modules():
        if name == stems[0]:
            module.register_forward_hook(_MaskOutput(state))
            module.register_forward_hook(_MaskTokenAtStem(state))
        elif _BLOCK.match(name):
            module.register_forward_hook(_MaskOutput(state))
        elif isinstance(module, nn.Conv2d) or _is_channels_first_norm(module):
            module.register_forward_hook(_MaskOutput(state))
        elif isinstance(module, nn.MaxPool2d):
            module.register_forward_pre_hook(_MaxPoolInput(state))
            module.register_forward_hook(_MaskPooledOutput(state))
        elif type(module) is nn.BatchNorm2d:
            module.__class__ = SparseBatchNorm2d
            module._mask_state = state
        elif type(module).__name__.endswith("GRN"):
            module.register_forward_pre_hook(_MaskInput(state, channels_last=True))


__all__ = ["MaskState", "SparseBatchNorm2d", "install", "visible_batch_norm"]
