"""One description per encoder family (`simmim_hf.backbones`): pretraining's optimizer (built by `SimMIMTrainer`) and
fine-tuning exempt the same parameters from weight decay and give them the same layer ids, and both follow the
official microsoft/SimMIM rules (written out here, with literal expected ids for a tiny ViT, Swin and ConvNeXt);
prefix tokens and output width match the stock models."""

import copy

import pytest
import torch
from tiny_configs import CONVNETS, ENCODERS, PLAIN_TINY
from transformers import AutoModel, AutoModelForImageClassification, DeiTConfig, Swinv2Config

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMModel
from simmim_hf.backbones import (
    ALL_TOKENS_NO_WEIGHT_DECAY,
    SUPPORTED_ENCODERS,
    encoder_structure,
    is_convnet,
    is_hierarchical,
    num_prefix_tokens,
    output_width,
)
from simmim_hf.eval.layer_decay import param_groups_layer_decay
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
from simmim_hf.pretrain.trainer import SimMIMTrainer

TINY = {
    **ENCODERS,
    **CONVNETS,
    "deit": lambda: DeiTConfig(**PLAIN_TINY, encoder_stride=4),
    "swinv2": lambda: Swinv2Config(
        image_size=32, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 2], num_heads=[2, 2], window_size=4
    ),
}


def _config(family: str, exemptions: str | None = None) -> SimMIMConfig:
    return SimMIMConfig(encoder_config=TINY[family](), mask_patch_size=8, weight_decay_exemptions=exemptions)


def _pretraining_exempt(model, tmp_path) -> set[str]:
    """The parameters in the weight-decay-0 groups of the optimizer the pretraining Trainer builds."""
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=0.05)
    optimizer = SimMIMTrainer(model=model, args=args).create_optimizer()
    names = {id(param): name for name, param in model.named_parameters()}
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.05}
    return {names[id(p)] for group in optimizer.param_groups if group["weight_decay"] == 0 for p in group["params"]}


def _finetuning_groups(model, **kwargs) -> dict[str, tuple[int, bool]]:
    """name -> (layer id, exempt from weight decay) in fine-tuning's layer-decay groups."""
    groups = param_groups_layer_decay(model, base_lr=1.0, weight_decay=0.05, **kwargs)
    return {name: (group["layer_id"], group["weight_decay"] == 0) for group in groups for name in group["names"]}


def test_every_supported_family_is_covered():
    assert set(TINY) == set(SUPPORTED_ENCODERS)


@pytest.mark.parametrize("exemptions", [None, "official", "all-tokens"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_pretraining_and_finetuning_exempt_the_same_parameters(family, exemptions, tmp_path):
    model = SimMIMForMaskedImageModeling(_config(family, exemptions))
    finetuning = _finetuning_groups(model, weight_decay_exemptions=exemptions)
    assert _pretraining_exempt(model, tmp_path) == {n for n, (_, exempt) in finetuning.items() if exempt}


# The official microsoft/SimMIM rule (optimizer.py, `get_pretrain_param_groups` / `get_finetune_param_groups`): a
# parameter is exempt when it is 1-D, ends in `.bias`, is in the model's `no_weight_decay()` list or contains one of
# its `no_weight_decay_keywords()`. The lists (models/simmim.py, vision_transformer.py, swin_transformer.py): ViT
# {pos_embed, cls_token}, no keywords (its mask token is decayed); Swin {absolute_pos_embed, mask_token}, keyword
# relative_position_bias_table. Below in transformers' names.
OFFICIAL_LISTS = {
    "vit": ({"simmim.encoder.embeddings.position_embeddings", "simmim.encoder.embeddings.cls_token"}, ()),
    "swin": (
        {"simmim.encoder.embeddings.position_embeddings", "simmim.encoder.embeddings.mask_token"},
        ("relative_position_bias_table",),
    ),
}


@pytest.mark.parametrize("family", sorted(OFFICIAL_LISTS))
def test_official_exemptions_follow_the_official_lists(family, tmp_path):
    model = SimMIMForMaskedImageModeling(_config(family, "official"))
    names, keywords = OFFICIAL_LISTS[family]
    expected = {
        name
        for name, param in model.named_parameters()
        if param.ndim == 1 or name.endswith(".bias") or name in names or any(key in name for key in keywords)
    }
    assert _pretraining_exempt(model, tmp_path) == expected
    assert ("simmim.encoder.embeddings.mask_token" in expected) == (family == "swin")
    assert "decoder.0.weight" not in expected and "decoder.0.bias" in expected


def test_convnext_exempts_its_1d_parameters_and_its_decoder_tokens(tmp_path):
    """ConvNeXt (no official SimMIM list): every 1-D parameter, plus the decoder's 4-D mask token and GRN parameters
    (shape (1, 1, 1, C), ConvNeXt V2's own exemption), nothing else."""
    model = SimMIMForMaskedImageModeling(_config("convnext"))
    expected = {name for name, param in model.named_parameters() if param.ndim == 1} | {
        "decoder.mask_token",
        "decoder.blocks.0.grn.weight",
        "decoder.blocks.0.grn.bias",
    }
    assert _pretraining_exempt(model, tmp_path) == expected


# Layer ids written out for the tiny encoders, from the official rules (optimizer.py `get_vit_layer`,
# `get_swin_layer`; ids 0 .. num_layers + 1): tokens and patch embedding 0, block i (Swin: counted across stages) i + 1,
# a Swin stage's patch merging (`reduction`, `norm`) the id of the stage's last block, everything else (final norm,
# decoder) num_layers + 1. ConvNeXt (ConvNeXt V2's per-block rule): a stage's downsampling goes with its first block.
# Each prefix names every parameter under it; every parameter is under exactly one prefix.
LITERAL_LAYER_IDS = {
    "vit": {  # 2 blocks
        "simmim.encoder.embeddings.": 0,
        "simmim.encoder.layers.0.": 1,
        "simmim.encoder.layers.1.": 2,
        "simmim.encoder.layernorm.": 3,
        "decoder.": 3,
    },
    "swin": {  # depths [1, 2]
        "simmim.encoder.embeddings.": 0,
        "simmim.encoder.encoder.layers.0.blocks.0.": 1,
        "simmim.encoder.encoder.layers.0.downsample.": 1,
        "simmim.encoder.encoder.layers.1.blocks.0.": 2,
        "simmim.encoder.encoder.layers.1.blocks.1.": 3,
        "simmim.encoder.layernorm.": 4,
        "decoder.": 4,
    },
    "convnext": {  # depths [1, 2, 1]
        "simmim.encoder.embeddings.": 0,
        "simmim.encoder.encoder.stages.0.layers.0.": 1,
        "simmim.encoder.encoder.stages.1.downsampling_layer.": 2,
        "simmim.encoder.encoder.stages.1.layers.0.": 2,
        "simmim.encoder.encoder.stages.1.layers.1.": 3,
        "simmim.encoder.encoder.stages.2.downsampling_layer.": 4,
        "simmim.encoder.encoder.stages.2.layers.0.": 4,
        "simmim.encoder.layernorm.": 5,
        "decoder.mask_token": 0,
        "decoder.proj.": 5,
        "decoder.blocks.0.": 5,
        "decoder.pred.": 5,
    },
}


@pytest.mark.parametrize("family", sorted(LITERAL_LAYER_IDS))
def test_layer_ids_are_the_literal_official_ones(family):
    model = SimMIMForMaskedImageModeling(_config(family))
    table = LITERAL_LAYER_IDS[family]
    finetuning = _finetuning_groups(model)
    for name, _ in model.named_parameters():
        (expected,) = [layer_id for prefix, layer_id in table.items() if name.startswith(prefix)]
        assert model.layer_id(name) == expected == finetuning[name][0], name


def test_swinv2_logit_scale_is_exempt_in_both():
    # The two lists disagreed: pretraining's "all-tokens" had `logit_scale`, fine-tuning's did not (a 3-D tensor).
    model = SimMIMForMaskedImageModeling(_config("swinv2", "all-tokens"))
    scales = {name for name, param in model.named_parameters() if name.endswith("logit_scale")}
    assert scales and all(param.ndim == 3 for name, param in model.named_parameters() if name in scales)
    assert scales <= model.no_weight_decay()
    assert all(_finetuning_groups(model, weight_decay_exemptions="all-tokens")[name][1] for name in scales)
    assert {"logit_scale", "pos_embed", "register_tokens"} <= set(ALL_TOKENS_NO_WEIGHT_DECAY)


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_stock_classifier_fine_tunes_with_the_pretraining_rule(family):
    """Fine-tuning the exported encoder as a stock classifier (the family's default exemptions, no SimMIM config)
    exempts and layer-ids each encoder parameter as pretraining did."""
    config = _config(family)
    model = SimMIMForMaskedImageModeling(config)
    encoder_config = copy.deepcopy(config.encoder_config)
    encoder_config.architectures = []  # DeiT has two classifier classes: the first one (no teacher)
    classifier = AutoModelForImageClassification.from_config(encoder_config)
    prefix = classifier.base_model_prefix + "."
    pretraining = {name.removeprefix("simmim.encoder."): name for name, _ in model.named_parameters()}
    exempt = model.no_weight_decay()
    finetuning = _finetuning_groups(classifier)
    common = [name for name in finetuning if name.startswith(prefix) and name[len(prefix) :] in pretraining]
    assert len(common) > 10
    for name in common:
        ours = pretraining[name[len(prefix) :]]
        assert finetuning[name] == (model.layer_id(ours), ours in exempt), name


@pytest.mark.parametrize("family", sorted(TINY))
def test_layer_ids_agree_between_the_model_and_layer_decay(family):
    model = SimMIMForMaskedImageModeling(_config(family))
    structure = encoder_structure(model.config)
    assert structure == encoder_structure(model.config.encoder_config)
    assert model.num_layers() == structure.num_layers
    assert (structure.depths is not None) == is_hierarchical(family)
    finetuning = _finetuning_groups(model)
    assert {name: layer_id for name, (layer_id, _) in finetuning.items()} == {
        name: model.layer_id(name) for name, _ in model.named_parameters()
    }
    assert set(model.layer_id(name) for name, _ in model.named_parameters()) == set(range(structure.num_layers + 2))


@pytest.mark.parametrize("family", sorted(TINY))
def test_prefix_tokens_and_output_width_match_the_stock_model(family):
    config = _config(family)
    pixel_values = torch.randn(2, 3, 32, 32)
    grid = (32 // config.encoder_stride) ** 2
    stock = AutoModel.from_config(config.encoder_config).eval()
    ours = SimMIMModel(config).eval()
    with torch.no_grad():
        for model, encoder in ((stock, stock), (ours, ours.encoder)):
            hidden = model(pixel_values).last_hidden_state
            if is_convnet(family):  # a feature map (N, C, h, w)
                side = 32 // config.encoder_stride
                assert hidden.shape == (2, output_width(config), side, side), type(model)
            else:
                assert hidden.shape == (2, num_prefix_tokens(encoder) + grid, output_width(config)), type(model)
    prefix = {"vit": 1, "beit": 1, "deit": 2, "swin": 0, "swinv2": 0, "convnext": 0, "convnextv2": 0, "resnet": 0}
    assert num_prefix_tokens(stock) == prefix[family]
    assert output_width(config) == output_width(config.encoder_config)
