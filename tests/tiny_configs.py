"""Tiny encoder configs shared by the tests (ModelTester style: a few thousand parameters, a few images)."""

from transformers import BeitConfig, ConvNextConfig, ConvNextV2Config, ResNetConfig, SwinConfig, ViTConfig

from simmim_hf import SimMIMConfig

# The plain (ViT-like) encoders share their tiny dimensions: 8x8 grid of 4 px patches, 2 blocks of width 32.
PLAIN_TINY = dict(
    image_size=32,
    patch_size=4,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


def tiny_vit(**overrides) -> ViTConfig:
    return ViTConfig(**{**PLAIN_TINY, "encoder_stride": 4, "qkv_bias": True, **overrides})


def tiny_swin(**overrides) -> SwinConfig:
    kwargs = dict(
        image_size=32,
        patch_size=2,
        num_channels=3,
        embed_dim=16,
        depths=[1, 2],
        num_heads=[2, 2],
        window_size=4,
        encoder_stride=4,
    )
    kwargs.update(overrides)
    return SwinConfig(**kwargs)


def tiny_beit(**overrides) -> BeitConfig:
    kwargs = dict(
        PLAIN_TINY,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=0.1,
        use_mean_pooling=False,
    )
    kwargs.update(overrides)
    return BeitConfig(**kwargs)


# ConvNets at 32 px with an output stride of 8 (8 px mask cells, a 4x4 last feature map): ConvNeXt with a 2 px stem
# and 3 stages; ResNet with its stock 7x7 stem + max-pool (stride 4) and 2 bottleneck stages.
CONVNEXT_TINY = dict(
    image_size=32, patch_size=2, num_channels=3, num_stages=3, depths=[1, 2, 1], hidden_sizes=[8, 16, 24]
)


def tiny_convnext(**overrides) -> ConvNextConfig:
    return ConvNextConfig(**{**CONVNEXT_TINY, **overrides})


def tiny_convnextv2(**overrides) -> ConvNextV2Config:
    return ConvNextV2Config(**{**CONVNEXT_TINY, **overrides})


def tiny_resnet(**overrides) -> ResNetConfig:
    kwargs = dict(image_size=32, num_channels=3, embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1])
    return ResNetConfig(**{**kwargs, **overrides})


ENCODERS = {"vit": tiny_vit, "swin": tiny_swin, "beit": tiny_beit}
CONVNETS = {"convnext": tiny_convnext, "convnextv2": tiny_convnextv2, "resnet": tiny_resnet}


def tiny_simmim_config(encoder: str = "vit", mask_patch_size: int = 8, **encoder_overrides) -> SimMIMConfig:
    return SimMIMConfig(encoder_config=ENCODERS[encoder](**encoder_overrides), mask_patch_size=mask_patch_size)


def tiny_convnet_config(encoder: str = "convnextv2", mask_patch_size: int = 8, **settings) -> SimMIMConfig:
    """A tiny ConvNet SimMIM config; `settings` are SimMIM fields (conv_masking, decoder_type, loss_type, ...)."""
    settings.setdefault("decoder_hidden_size", 16)
    return SimMIMConfig(encoder_config=CONVNETS[encoder](), mask_patch_size=mask_patch_size, **settings)
