"""What an encoder looks at, as pictures of a fixed batch: the PCA of its last feature map (three principal
components as RGB, DINOv2-style, every encoder family) and, for plain ViT/DeiT/BEiT encoders, the last block's
CLS-to-patch attention of each head (DINO-style), computed with eager attention.

`encoder` below is a stock transformers encoder (`AutoModel`), a `SimMIMModel` or a `SimMIMForMaskedImageModeling`
(its encoder is used, with no mask). Pictures are PIL images; `grid_image` of `visualization` lays them out.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .backbones import PLAIN_ENCODERS, encoder_config_of, num_prefix_tokens
from .visualization import denormalize, grid_image


def _parts(encoder: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the module to call with `pixel_values`, the stock encoder inside it)."""
    base = getattr(encoder, "simmim", encoder)  # SimMIMForMaskedImageModeling -> SimMIMModel
    stock = getattr(base, "encoder", None)
    if stock is not None and hasattr(stock, "config") and getattr(base.config, "model_type", None) == "simmim":
        return base, stock
    return encoder, encoder


def model_type_of(encoder: nn.Module) -> str:
    return encoder_config_of(_parts(encoder)[1].config).model_type


def has_cls_attention(encoder: nn.Module) -> bool:
    """Whether the attention picture applies: a plain ViT/DeiT/BEiT encoder with a CLS token."""
    _, stock = _parts(encoder)
    return model_type_of(encoder) in PLAIN_ENCODERS and num_prefix_tokens(stock) >= 1


def _grid(tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) patch grid of `tokens` patches for an image of `height` x `width`."""
    rows = max(1, round((tokens * height / width) ** 0.5))
    if tokens % rows:
        raise ValueError(f"cannot lay {tokens} patch tokens out on a grid for a {height}x{width} image")
    return rows, tokens // rows


@torch.no_grad()
def last_feature_map(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The encoder's last feature map `(B, D, h, w)` (prefix tokens dropped, tokens laid out on the patch grid).

    pixel_values: `(B, C, H, W)` normalised, on the encoder's device.
    """
    call, stock = _parts(encoder)
    hidden = call(pixel_values=pixel_values).last_hidden_state
    if hidden.ndim == 4:  # ConvNets: already a map
        return hidden.float()
    patches = hidden[:, num_prefix_tokens(stock) :]
    rows, cols = _grid(patches.shape[1], *pixel_values.shape[-2:])
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], rows, cols).float()


def pca_rgb(feature_map: torch.Tensor) -> torch.Tensor:
    """Three principal components of all patch features of the batch, as RGB in [0, 1].

    feature_map: `(B, D, h, w)` -> `(B, 3, h, w)`. The components are fitted on the batch (centred features, SVD);
    each one's sign is fixed so that its largest loading is positive, and each is min-max scaled over the batch, so
    the picture is a deterministic function of the features. Fewer than three components (D < 3 or too few
    patches) leave the missing channels at 0.
    """
    batch, dim, rows, cols = feature_map.shape
    x = feature_map.double().permute(0, 2, 3, 1).reshape(-1, dim)
    x = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    components = vh[:3]
    flip = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * torch.where(flip == 0, torch.ones_like(flip), flip)
    projected = x @ components.T  # (B*h*w, <=3)
    low, high = projected.min(dim=0).values, projected.max(dim=0).values
    projected = (projected - low) / (high - low).clamp_min(1e-12)
    rgb = torch.zeros(x.shape[0], 3, dtype=torch.float64)
    rgb[:, : projected.shape[1]] = projected
    return rgb.reshape(batch, rows, cols, 3).permute(0, 3, 1, 2).float()


@contextmanager
def eager_attention(stock: nn.Module) -> Iterator[None]:
    """The encoder's attention switched to the eager kernel (which returns its weights) for the block, then back."""
    previous = getattr(stock.config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    stock.set_attn_implementation("eager")
    try:
        yield
    finally:
        stock.set_attn_implementation(previous)


@torch.no_grad()
def cls_attention(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The last block's attention from the CLS token to the patches, per head: `(B, heads, h, w)`.

    Each head's row of the softmax is renormalised over the patches (the CLS token's attention to itself and to
    other prefix tokens is left out), so each map sums to 1. pixel_values: `(B, C, H, W)` normalised.
    """
    if not has_cls_attention(encoder):
        raise ValueError(f"attention maps need a plain ViT/DeiT/BEiT encoder, not {model_type_of(encoder)!r}")
    call, stock = _parts(encoder)
    with eager_attention(stock):
        attentions = call(pixel_values=pixel_values, output_attentions=True).attentions
    if not attentions:
        raise ValueError(f"{type(stock).__name__} returned no attention weights")
    prefix = num_prefix_tokens(stock)
    weights = attentions[-1][:, :, 0, prefix:].float()  # (B, heads, patches)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    rows, cols = _grid(weights.shape[-1], *pixel_values.shape[-2:])
    return weights.reshape(*weights.shape[:2], rows, cols)


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return nn.functional.interpolate(maps, size=size, mode="nearest")


def _rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _prepare(encoder: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, bool]:
    parameter = next(encoder.parameters())
    was_training = encoder.training
    encoder.eval()
    return pixel_values.to(device=parameter.device, dtype=parameter.dtype), was_training


def pca_picture(
    encoder: nn.Module, pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> Image.Image:
    """Two rows: the images, and the PCA of their last feature map (`pca_rgb`) upsampled to the image size."""
    inputs, was_training = _prepare(encoder, pixel_values)
    try:
        rgb = pca_rgb(last_feature_map(encoder, inputs).cpu())
    finally:
        encoder.train(was_training)
    original = _rgb(denormalize(pixel_values.float().cpu(), mean, std))
    rows = torch.stack([original, _upsample(rgb, tuple(original.shape[-2:]))])
    return grid_image(rows, scale=max(1, 128 // original.shape[-1]))


def attention_picture(
    encoder: nn.Module, pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> Image.Image:
    """One row of images, then one row per head: its CLS-to-patch attention, each map min-max scaled on its own (white: most attended)."""
    inputs, was_training = _prepare(encoder, pixel_values)
    try:
        maps = cls_attention(encoder, inputs).cpu()  # (B, heads, h, w)
    finally:
        encoder.train(was_training)
    original = _rgb(denormalize(pixel_values.float().cpu(), mean, std))
    low, high = maps.amin(dim=(2, 3), keepdim=True), maps.amax(dim=(2, 3), keepdim=True)
    shown = (maps - low) / (high - low).clamp_min(1e-12)
    shown = _upsample(shown, tuple(original.shape[-2:]))  # (B, heads, H, W)
    heads = [shown[:, h : h + 1].expand(-1, 3, -1, -1) for h in range(shown.shape[1])]
    rows = torch.stack([original, *heads])
    return grid_image(rows, scale=max(1, 128 // original.shape[-1]))


def save_feature_pictures(
    encoder: nn.Module,
    pixel_values: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    pca_path: str | Path,
    attention_path: str | Path | None,
) -> dict[str, Image.Image]:
    """Writes the PCA picture (and the attention picture, for encoders that have one and a path) as PNGs; returns
    the pictures by kind (`pca`, `attention`)."""
    pictures = {"pca": pca_picture(encoder, pixel_values, mean, std)}
    if attention_path is not None and has_cls_attention(encoder):
        pictures["attention"] = attention_picture(encoder, pixel_values, mean, std)
    for kind, path in (("pca", pca_path), ("attention", attention_path)):
        if kind in pictures:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            pictures[kind].save(path)
    return pictures
