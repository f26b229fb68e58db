"""SimMIM (Xie et al., CVPR 2022) over stock transformers encoders.

The encoder is an unmodified transformers model (`ViTModel`, `SwinModel`, `Swinv2Model`, `DeiTModel`, `BeitModel`)
with its mask token switched on, or a stock ConvNet (`ConvNextModel`, `ConvNextV2Model`, `ResNetModel`) masked by
forward hooks (`sparse_masking`), so the checkpoint layout is the stock one under a `simmim.encoder.` prefix, the
attention kernel is the one `attn_implementation` selects among those the stock class declares
(`backbones.attention_kernels`: ViT and DeiT eager, sdpa, flash, flex; ConvNets eager), and export is a key strip.
The head is the paper's (`decoder_type="linear"`: a 1x1 convolution to `stride**2 * C` channels and a PixelShuffle
back to pixels) or FCMAE's light decoder (`"conv"`, `SimMIMConvDecoder`); the loss is L1 (or L2, smooth L1) over
masked pixels only, optionally against per-cell normalised pixels (`norm_target`).

Self-contained (imports only torch, transformers, the config module, `backbones` and `sparse_masking`) so it also
works as Hub remote code.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, ConvNextV2Config, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.modeling_outputs import BaseModelOutput, MaskedImageModelingOutput
from transformers.models.convnextv2.modeling_convnextv2 import ConvNextV2GRN, ConvNextV2Layer
from transformers.utils.generic import can_return_tuple

from .backbones import (
    attention_kernels,
    check_attention_kernel,
    encoder_kwargs,
    encoder_structure,
    get_layer_id,
    is_convnet,
    no_weight_decay_names,
    num_prefix_tokens,
    output_width,
    stock_encoder_class,
)
from .configuration_simmim import SimMIMConfig
from .sparse_masking import MaskState, install

logger = logging.getLogger(__name__)


def build_encoder(config: SimMIMConfig) -> PreTrainedModel:
    """The stock encoder for `config.encoder_config`, with a mask token and without a pooler, initialised once: by
    its own class (`initializer="stock"`), or, with `initializer="official"`, built without any init and then given
    microsoft/SimMIM's (`init_official_weights`), its modules marked initialised so that no later `post_init` redraws
    them. Inside `from_pretrained` (meta device) nothing is drawn: the checkpoint's weights replace them."""
    encoder_config = config.encoder_config
    model_class = AutoModel._model_mapping[type(encoder_config)]
    if getattr(config, "initializer", "stock") != "official":
        return model_class(encoder_config, **encoder_kwargs(encoder_config))
    with no_init_weights():
        encoder = model_class(encoder_config, **encoder_kwargs(encoder_config))
    if not _on_meta(encoder):
        init_official_weights(encoder, encoder_config.model_type)
        mark_initialised(encoder)
    return encoder


def _on_meta(module: nn.Module) -> bool:
    return any(param.device.type == "meta" for param in module.parameters())


def mark_initialised(module: nn.Module) -> None:
    """Flags `module`, its submodules and tensors as initialised (transformers' `_is_hf_initialized`), so that a
    `post_init` of a model holding it leaves their values alone."""
    for sub in module.modules():
        sub._is_hf_initialized = True
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor._is_hf_initialized = True


def set_encoder_attention(encoder_config: Any, attn_implementation: str | None) -> None:
    """Sets the encoder's attention kernel (None: leaves the default), after checking that its family runs it
    (`backbones.check_attention_kernel`: ValueError naming the family and the kernels it has)."""
    check_attention_kernel(encoder_config.model_type, attn_implementation)
    if attn_implementation:
        encoder_config._attn_implementation = attn_implementation


@torch.no_grad()
def init_mask_token(encoder: nn.Module) -> None:
    """The paper's mask-token init: truncated normal, std 0.02 (stock encoders start it at zero)."""
    nn.init.trunc_normal_(encoder.embeddings.mask_token, std=0.02)


# A block's attention output projection and MLP output layer, in both transformers naming schemes.
_RESIDUAL_OUTPUT = re.compile(
    r"(?:^|\.)layers?\.(\d+)\.(?:attention\.o_proj|attention\.output\.dense|mlp\.fc2|output\.dense)$"
)


@torch.no_grad()
def init_official_weights(encoder: nn.Module, model_type: str, decoder: nn.Module | None = None) -> None:
    """microsoft/SimMIM's initialisation, for a fresh BEiT (the official BEiT-style ViT) or Swin encoder.

    BEiT-style ViT (models/vision_transformer.py with the SimMIM subclass's `_trunc_normal_`): Linear and
    patch-embedding weights, CLS token, mask token and absolute positions drawn from a normal of std 0.02 truncated
    at +-1 std (+-0.02), biases 0, LayerNorm 1/0, relative position tables 0, layer scale at
    `layer_scale_init_value`; then block i's (1-based) attention output and fc2 weights divided by sqrt(2 i).
    Swin (models/swin_transformer.py): Linear weights, relative position tables, mask token and absolute positions
    from a normal of std 0.02 truncated at +-2 (absolute, i.e. 100 std: effectively untruncated), biases 0,
    LayerNorm 1/0, the patch-embedding convolution left at PyTorch's default init.
    The reconstruction head (`decoder`, a 1x1 convolution) keeps PyTorch's default init in both.
    """
    if model_type == "beit":
        std = 0.02
        for module in encoder.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std, a=-std, b=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        embeddings = encoder.embeddings
        for name in ("cls_token", "mask_token", "position_embeddings"):
            tensor = getattr(embeddings, name, None)
            if isinstance(tensor, nn.Parameter):
                nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)
        for name, param in encoder.named_parameters():
            if name.endswith("relative_position_bias_table"):
                nn.init.zeros_(param)
            elif re.search(r"\.lambda_[12]$", name):
                nn.init.constant_(param, float(encoder.config.layer_scale_init_value))
        for name, module in encoder.named_modules():
            match = _RESIDUAL_OUTPUT.search(name)
            if match is not None:
                module.weight.div_(math.sqrt(2.0 * (int(match.group(1)) + 1)))
    elif model_type == "swin":
        for module in encoder.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                module.reset_parameters()
            table = getattr(module, "relative_position_bias_table", None)
            if isinstance(table, nn.Parameter):
                nn.init.trunc_normal_(table, std=0.02)
        for name in ("mask_token", "position_embeddings"):
            tensor = getattr(encoder.embeddings, name, None)
            if isinstance(tensor, nn.Parameter):
                nn.init.trunc_normal_(tensor, std=0.02)
    else:
        raise ValueError(f"initializer='official' exists for BEiT and Swin encoders only, not {model_type!r}")
    if decoder is not None:
        for module in decoder.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()


def _init_after_post_init(config: SimMIMConfig, base: SimMIMModel, decoder: nn.Module | None = None) -> None:
    """Runs once per construction, after the outermost model's `post_init`: the paper's mask tokens (truncated normal,
    std 0.02), which the stock encoder's own init leaves at zero - the encoder's (stock init only: the official one
    drew it already), a ConvNet's stem token (token mode) and the "conv" decoder's."""
    tokens = [getattr(base, "mask_token", None), getattr(decoder, "mask_token", None)]
    official = getattr(config, "initializer", "stock") == "official"
    if not official and not is_convnet(config.encoder_config.model_type):
        tokens.append(base.encoder.embeddings.mask_token)
    with torch.no_grad():
        for token in tokens:
            if isinstance(token, nn.Parameter) and token.device.type != "meta":
                nn.init.trunc_normal_(token, std=0.02)


def upsample_mask(bool_masked_pos: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """Patch mask to pixel mask.

    bool_masked_pos: (N, grid_h * grid_w), 1 = masked. Returns (N, 1, grid_h * patch_size, grid_w * patch_size).
    """
    mask = bool_masked_pos.reshape(-1, grid[0], grid[1])
    mask = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return mask.unsqueeze(1)


def masked_l1_loss(pixel_values: torch.Tensor, reconstruction: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """The paper's loss: L1 summed over masked pixels, divided by (masked pixels + 1e-5) and by the channels.

    pixel_values, reconstruction: (N, C, H, W); pixel_mask: (N, 1, H, W), 1 = masked.
    """
    return masked_reconstruction_loss(pixel_values, reconstruction, pixel_mask, "l1")


_PIXEL_LOSSES = {
    "l1": nn.functional.l1_loss,
    "l2": nn.functional.mse_loss,
    "smooth_l1": nn.functional.smooth_l1_loss,  # beta 1
}


def masked_reconstruction_loss(
    target: torch.Tensor, reconstruction: torch.Tensor, pixel_mask: torch.Tensor, loss_type: str = "l1"
) -> torch.Tensor:
    """A per-pixel distance (`loss_type`: "l1", "l2" squared error, "smooth_l1" Huber with beta 1) summed over masked
    pixels, divided by (masked pixels + 1e-5) and by the channels (the paper's normalisation).

    target, reconstruction: (N, C, H, W); pixel_mask: (N, 1, H, W), 1 = masked. Returns a scalar.
    """
    if loss_type not in _PIXEL_LOSSES:
        raise ValueError(f"loss_type must be one of {tuple(_PIXEL_LOSSES)}, got {loss_type!r}")
    mask = pixel_mask.to(reconstruction.dtype)
    loss = _PIXEL_LOSSES[loss_type](target.to(reconstruction.dtype), reconstruction, reduction="none")
    return (loss * mask).sum() / (mask.sum() + 1e-5) / target.shape[1]


def cell_statistics(pixel_values: torch.Tensor, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each `cell x cell` mask cell over its pixels and channels (MAE's norm_pix:
    unbiased variance, + 1e-6 under the root), broadcast back to pixels.

    pixel_values: (N, C, H, W) with H, W multiples of `cell`. Returns two (N, 1, H, W) tensors.
    """
    batch, channels, height, width = pixel_values.shape
    cells = pixel_values.reshape(batch, channels, height // cell, cell, width // cell, cell)
    cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(batch, height // cell, width // cell, -1)
    mean = cells.mean(dim=-1)
    std = (cells.var(dim=-1) + 1e-6).sqrt()

    def to_pixels(values: torch.Tensor) -> torch.Tensor:
        return values.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2).unsqueeze(1)

    return to_pixels(mean), to_pixels(std)


def normalized_target(pixel_values: torch.Tensor, cell: int) -> torch.Tensor:
    """The `norm_target` reconstruction target: each mask cell's pixels minus the cell's mean, over its standard
    deviation (`cell_statistics`). pixel_values: (N, C, H, W). Returns (N, C, H, W)."""
    mean, std = cell_statistics(pixel_values, cell)
    return (pixel_values - mean) / std


class SimMIMConvDecoder(nn.Module):
    """FCMAE's light decoder (`decoder_type="conv"`): a 1x1 projection of the encoder's feature map to `hidden_size`
    channels, the learnable mask token at masked positions, `depth` ConvNeXt V2 blocks (7x7 depthwise conv, LayerNorm,
    MLP with GRN), then a 1x1 convolution to `stride**2 * out_channels` and a PixelShuffle back to pixels.

    forward: features (N, D, h, w), masked (N, 1, h, w) with 1 = masked, or None. Returns (N, out_channels, h * stride,
    w * stride).
    """

    def __init__(self, in_channels: int, hidden_size: int, depth: int, stride: int, out_channels: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, hidden_size, 1, 1))
        block_config = ConvNextV2Config(hidden_act="gelu")
        self.blocks = nn.ModuleList(ConvNextV2Layer(block_config, dim=hidden_size) for _ in range(depth))
        self.pred = nn.Conv2d(hidden_size, stride**2 * out_channels, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, features: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.proj(features)
        if masked is not None:
            masked = masked.to(hidden.dtype)
            hidden = hidden * (1.0 - masked) + self.mask_token.to(hidden.dtype) * masked
        for block in self.blocks:
            hidden = block(hidden)
        return self.shuffle(self.pred(hidden))


def build_decoder(config: SimMIMConfig) -> nn.Module:
    """The reconstruction head `config.decoder_type` names (parameter names `decoder.0.*` for "linear", the paper's
    and transformers' layout)."""
    stride, channels, width = config.encoder_stride, config.num_channels, output_width(config)
    if getattr(config, "decoder_type", "linear") == "conv":
        return SimMIMConvDecoder(width, config.decoder_hidden_size, config.decoder_depth, stride, channels)
    return nn.Sequential(nn.Conv2d(width, stride**2 * channels, kernel_size=1), nn.PixelShuffle(stride))


def stem_width(encoder_config: Any) -> int:
    """Channels of a ConvNet's stem output (where token mode puts the mask token)."""
    if encoder_config.model_type == "resnet":
        return int(encoder_config.embedding_size)
    return int(encoder_config.hidden_sizes[0])


class SimMIMPreTrainedModel(PreTrainedModel):
    config_class = SimMIMConfig
    base_model_prefix = "simmim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True

    # The kernels this model runs are its encoder family's, as the stock class declares them (transformers reads
    # these on the instance when it checks an `attn_implementation`).
    @property
    def _supports_sdpa(self) -> bool:
        return "sdpa" in attention_kernels(self.config.encoder_config.model_type)

    @property
    def _supports_flash_attn(self) -> bool:
        return "flash_attention_2" in attention_kernels(self.config.encoder_config.model_type)

    @property
    def _supports_flex_attn(self) -> bool:
        return "flex_attention" in attention_kernels(self.config.encoder_config.model_type)

    @property
    def _supports_attention_backend(self) -> bool:
        return bool(getattr(stock_encoder_class(self.config.encoder_config.model_type), "_supports_attention_backend",
                            False))  # fmt: skip

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The stock encoder initialises itself (transformers dispatches to each sub-model's own init); here only the
        # 1x1 head. The mask token (and, with `initializer="official"`, everything) is set after post_init
        # (`_init_after_post_init`), since the encoder's init zeroes it.
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ConvNextV2GRN):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters trained without weight decay (timm style), as `backbones.no_weight_decay_names` says
        for `config.weight_decay_exemptions`: every bias and 1-D tensor (norms, layer scale), plus "official":
        microsoft/SimMIM per backbone (plain ViT: CLS token, absolute positions; Swin: mask token, absolute
        positions, relative position tables) or "all-tokens": every token, position embedding, relative position
        table and scale. Fine-tuning (`eval.layer_decay.param_groups_layer_decay`) exempts the same names."""
        return no_weight_decay_names(self)

    def num_layers(self) -> int:
        """Number of transformer blocks, for layer-wise LR decay (Swin: summed over stages)."""
        return encoder_structure(self.config).num_layers

    def layer_id(self, name: str) -> int:
        """Layer id of a parameter for layer-wise LR decay (`backbones.get_layer_id`, which fine-tuning's
        `param_groups_layer_decay` uses too): 0 for embeddings (and the mask token), i + 1 for block i (counted
        across Swin stages), `num_layers() + 1` for the final norm and the head."""
        model_type, num_layers, depths = encoder_structure(self.config)
        return get_layer_id(name, num_layers, model_type, depths)


class SimMIMModel(SimMIMPreTrainedModel):
    """The SimMIM encoder: a stock transformers encoder whose mask token replaces masked patch embeddings, or a stock
    ConvNet masked sparsely or with a mask token at its stem (`config.conv_masking`, `sparse_masking`)."""

    # Loading a full SimMIM checkpoint as the bare encoder leaves the reconstruction head out, by design.
    _keys_to_ignore_on_load_unexpected = [r"^decoder\."]

    def __init__(self, config: SimMIMConfig, _building_submodule: bool = False) -> None:
        super().__init__(config)
        self.encoder = build_encoder(config)
        self._convnet = is_convnet(config.encoder_config.model_type)
        if self._convnet:
            # The hooks read the mask of the pass in progress from here (a plain attribute: no parameters).
            self._mask_state = MaskState()
            install(self.encoder, self._mask_state)
            if config.conv_masking == "token":
                self.mask_token = nn.Parameter(torch.zeros(stem_width(config.encoder_config)))
        # FSDP auto-wrapping and `device_map` read the block classes from the top-level model.
        self._no_split_modules = list(self.encoder._no_split_modules or [])
        self.post_init()
        if not _building_submodule:
            _init_after_post_init(config, self)

    def get_input_embeddings(self) -> nn.Module:
        if hasattr(self.encoder, "embedder"):  # ResNet
            return self.encoder.embedder.embedder.convolution
        return self.encoder.embeddings.patch_embeddings

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(N, C, H, W)`):
                Normalised images.
            bool_masked_pos (`torch.BoolTensor` of shape `(N, num_patches)`, *optional*):
                Which patches to replace by the mask token (1 = masked). None runs the encoder on the whole image.
            output_hidden_states (`bool`, *optional*):
                Also return the hidden states of every block.
            output_attentions (`bool`, *optional*):
                Also return the attention weights (where the attention implementation provides them).
            return_dict (`bool`, *optional*):
                Return a `BaseModelOutput` rather than a tuple (default: `config.return_dict`); handled by
                transformers' `can_return_tuple`.

        Returns:
            `BaseModelOutput`: `last_hidden_state` of shape `(N, prefix tokens + tokens, D)`, plus `hidden_states` /
            `attentions` when asked.
        """
        if bool_masked_pos is not None:
            bool_masked_pos = bool_masked_pos.to(torch.bool)
        if self._convnet:
            return self._forward_convnet(pixel_values, bool_masked_pos, output_hidden_states, **kwargs)
        outputs = self.encoder(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        return BaseModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def _forward_convnet(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None,
        output_hidden_states: bool | None,
        **kwargs: Any,
    ) -> BaseModelOutput:
        """A ConvNet pass: `last_hidden_state` is the last feature map `(N, C, h, w)`, `hidden_states` the stock
        model's (stem and stage outputs). Sparse mode zeroes masked pixels here; the hooks do the rest."""
        keep = None
        if bool_masked_pos is not None:
            patch = self.config.model_patch_size
            grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
            keep = ~upsample_mask(bool_masked_pos, grid, patch)
        mode = self.config.conv_masking
        if keep is not None and mode == "sparse":
            pixel_values = pixel_values * keep.to(pixel_values.dtype)
        token = getattr(self, "mask_token", None) if mode == "token" else None
        with self._mask_state.active(keep, mode, token):
            outputs = self.encoder(pixel_values, output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        return BaseModelOutput(last_hidden_state=outputs.last_hidden_state, hidden_states=outputs.hidden_states)


class HeldLoadReports(logging.Filter):
    """Holds back transformers' LOAD REPORT (a warning listing missing and unexpected keys) while a load runs.

    Used as `with HeldLoadReports() as reports: ...from_pretrained(...)`; the caller then decides: `reports.replay()`
    logs the held report after all (something unexpected was in it), otherwise it is dropped. A load that raises
    replays it. A filter on the logger,
    not a level: transformers runs extra checks when that logger's own level is WARNING or above.
    """

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True

    @staticmethod
    def _logger() -> logging.Logger:
        from transformers.utils import logging as transformers_logging

        return transformers_logging.get_logger("transformers.modeling_utils")

    def __enter__(self) -> HeldLoadReports:
        self._logger().addFilter(self)
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self._logger().removeFilter(self)
        if exc_type is not None:  # the load failed (transformers raises after its report): the report explains it
            self.replay()

    def replay(self) -> None:
        """Logs the held reports, as transformers would have."""
        for record in self.records:
            self._logger().handle(record)
        self.records.clear()


class SimMIMForMaskedImageModeling(SimMIMPreTrainedModel):
    """SimMIM: encoder + reconstruction head (the paper's 1x1 conv + PixelShuffle, or FCMAE's light decoder), a pixel
    loss on masked pixels only."""

    def __init__(self, config: SimMIMConfig) -> None:
        super().__init__(config)
        self.simmim = SimMIMModel(config, _building_submodule=True)
        self._no_split_modules = self.simmim._no_split_modules
        self.decoder = build_decoder(config)
        if getattr(config, "initializer", "stock") == "official":
            # microsoft/SimMIM leaves its 1x1 head at PyTorch's default init, which its constructor just drew.
            mark_initialised(self.decoder)
        # Tokens before the patch tokens in the encoder's output (CLS, distillation), dropped before the head.
        self._prefix_tokens = num_prefix_tokens(self.simmim.encoder)
        # One init: post_init initialises only what no one has (the head); then the mask tokens, once.
        self.post_init()
        _init_after_post_init(config, self.simmim, self.decoder)

    def get_input_embeddings(self) -> nn.Module:
        return self.simmim.get_input_embeddings()

    @classmethod
    def from_encoder(
        cls,
        name_or_path: str,
        config: SimMIMConfig | None = None,
        attn_implementation: str | None = None,
        **overrides: Any,
    ) -> SimMIMForMaskedImageModeling:
        """SimMIM over a stock encoder's pretrained weights, to continue pretraining it (e.g. on domain images).

        `name_or_path`: Hub id or folder of a ViT, DeiT, BEiT, Swin, Swinv2, ConvNeXt, ConvNeXt V2 or ResNet model, bare (`ViTModel`) or with a head
        (`ViTForImageClassification`, `BeitForMaskedImageModeling`, ...). The encoder is loaded with the stock
        class's `from_pretrained` (so transformers' own key conversions apply); a head in the checkpoint is dropped
        (logged). The checkpoint's mask token is kept where it has one; otherwise one is added (truncated normal, std
        0.02). The reconstruction head is new. `config` defaults to `SimMIMConfig.from_encoder(name_or_path,
        **overrides)`; overrides that change tensor shapes (width, depth, patch) cannot load the weights.
        """
        if config is None:
            config = SimMIMConfig.from_encoder(name_or_path, **overrides)
        elif overrides:
            raise ValueError(f"{', '.join(overrides)}: give either a config or overrides, not both")
        encoder_config = config.encoder_config
        set_encoder_attention(encoder_config, attn_implementation)
        encoder_class = AutoModel._model_mapping[type(encoder_config)]
        with HeldLoadReports() as reports:  # transformers' report of what we expect (a new mask token, a head)
            source, info = encoder_class.from_pretrained(
                name_or_path,
                config=encoder_config,
                output_loading_info=True,
                dtype=torch.float32,
                **encoder_kwargs(encoder_config),
            )
        if info.get("mismatched_keys") or info.get("error_msgs"):
            reports.replay()
            raise ValueError(
                f"{name_or_path}: its weights do not fit the SimMIM encoder config (mismatched "
                f"{sorted(map(str, info.get('mismatched_keys') or []))[:5]}); override only fields that keep shapes"
            )
        missing = {str(key) for key in info.get("missing_keys", [])}
        new_token = any(key.endswith("mask_token") for key in missing)
        others = sorted(key for key in missing if not key.endswith("mask_token"))
        if others:
            logger.warning("%s has no %s: initialised fresh", name_or_path, ", ".join(others))
        # A checkpoint tensor under one of the encoder's own modules that found no place is a surprise; anything
        # else (a classifier, a pooler, a MIM head) is the checkpoint's head, dropped by design.
        own_modules = {name for name, _ in source.named_children()}
        unexpected = [str(key) for key in info.get("unexpected_keys", [])]
        misplaced = sorted(key for key in unexpected if key.split(".")[0] in own_modules)
        if misplaced:
            logger.warning(
                "%s: %d tensor(s) have no place in the encoder: %s", name_or_path, len(misplaced), misplaced
            )
        if others or misplaced:
            reports.replay()  # then transformers' own report says it too
        dropped = sorted({key.split(".")[0] for key in unexpected if key.split(".")[0] not in own_modules})
        if dropped:
            logger.info("%s: dropped what the encoder does not use (the checkpoint's head): %s", name_or_path, dropped)
        model = cls(config)
        model.simmim.encoder.load_state_dict(source.state_dict())
        if new_token:
            init_mask_token(model.simmim.encoder)
        logger.info(
            "SimMIM from %s: encoder weights loaded, %s mask token, new reconstruction head",
            name_or_path,
            "new" if new_token else "the checkpoint's",
        )
        return model

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        # Remote code: transformers records only this class in `auto_map`; name the bare encoder too, so that
        # `AutoModel.from_pretrained(..., trust_remote_code=True)` works on the same checkpoint.
        if getattr(self, "_auto_class", None) is not None:
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.setdefault("AutoModel", "modeling_simmim.SimMIMModel")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs: Any,
    ) -> MaskedImageModelingOutput | tuple:
        """
        Args:
            pixel_values (`torch.Tensor` of shape `(N, C, H, W)`):
                Normalised images.
            bool_masked_pos (`torch.BoolTensor` of shape `(N, (H / patch) * (W / patch))`, *optional*):
                Which patches to mask (1 = masked), e.g. from `SimMIMMaskGenerator`. Without it there is no loss.
            output_hidden_states (`bool`, *optional*):
                Also return the encoder's hidden states of every block.
            output_attentions (`bool`, *optional*):
                Also return the encoder's attention weights.
            return_dict (`bool`, *optional*):
                Return a `MaskedImageModelingOutput` rather than a tuple (default: `config.return_dict`); handled
                by transformers' `can_return_tuple`.

        Returns:
            `MaskedImageModelingOutput`: `loss` (`config.loss_type` over masked pixels, when `bool_masked_pos` is
            given), `reconstruction` of shape `(N, C, H, W)` in normalised pixel units (with `norm_target`: in units
            of each mask cell's own statistics, `cell_statistics`), and `hidden_states` / `attentions` when asked.
        """
        batch_size, _, height, width = pixel_values.shape
        outputs = self.simmim(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        stride = self.config.encoder_stride
        grid = (height // stride, width // stride)
        if self.simmim._convnet:
            feature_map = outputs.last_hidden_state  # (N, D, grid_h, grid_w)
        else:
            tokens = outputs.last_hidden_state[:, self._prefix_tokens :]  # (N, grid_h * grid_w, D)
            feature_map = tokens.transpose(1, 2).reshape(batch_size, -1, grid[0], grid[1])
        pixel_mask = None
        if bool_masked_pos is not None:
            patch = self.config.model_patch_size
            pixel_mask = upsample_mask(bool_masked_pos.to(torch.bool), (height // patch, width // patch), patch)
        if isinstance(self.decoder, SimMIMConvDecoder):
            # mask cells are multiples of the stride: one pixel per output position says whether it is masked
            masked = None if pixel_mask is None else pixel_mask[:, :, ::stride, ::stride]
            reconstruction = self.decoder(feature_map, masked)
        else:
            reconstruction = self.decoder(feature_map)

        loss = None
        if pixel_mask is not None:
            target = pixel_values
            if getattr(self.config, "norm_target", False):
                target = normalized_target(pixel_values.to(reconstruction.dtype), self.config.mask_patch_size)
            loss = masked_reconstruction_loss(target, reconstruction, pixel_mask, self.config.loss_type)

        return MaskedImageModelingOutput(
            loss=loss,
            reconstruction=reconstruction,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["SimMIMPreTrainedModel", "SimMIMModel", "SimMIMForMaskedImageModeling", "SimMIMConvDecoder"]
