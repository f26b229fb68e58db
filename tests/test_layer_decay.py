"""Layer ids and layer-wise LR decay groups for ViT, BEiT and Swin, with in-memory and on-disk parameter names."""

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from tiny_configs import tiny_beit, tiny_simmim_config, tiny_swin, tiny_vit
from transformers import (
    BeitForImageClassification,
    SwinForImageClassification,
    SwinModel,
    ViTForImageClassification,
    ViTModel,
)

from simmim_hf import SimMIMForMaskedImageModeling
from simmim_hf.backbones import get_layer_id
from simmim_hf.eval.layer_decay import default_layer_decay, param_groups_layer_decay

SWIN_DEPTHS = [1, 2]  # tiny_swin


def _numel_per_layer(named_tensors, num_layers, model_type, depths=None) -> Counter:
    counts: Counter = Counter()
    for name, tensor in named_tensors:
        counts[get_layer_id(name, num_layers, model_type, depths)] += tensor.numel()
    return counts


@pytest.fixture(scope="module")
def vit_classifier():
    torch.manual_seed(0)
    return ViTForImageClassification(tiny_vit(num_labels=3))


@pytest.fixture(scope="module")
def swin_classifier():
    torch.manual_seed(0)
    return SwinForImageClassification(tiny_swin(num_labels=3))


def test_vit_ids_in_memory_names(vit_classifier):
    ids = {name: get_layer_id(name, 2, "vit") for name, _ in vit_classifier.named_parameters()}
    assert ids["vit.embeddings.cls_token"] == 0
    assert ids["vit.embeddings.position_embeddings"] == 0
    assert ids["vit.embeddings.patch_embeddings.projection.weight"] == 0
    assert ids["vit.layers.0.attention.q_proj.weight"] == 1
    assert ids["vit.layers.1.mlp.fc2.bias"] == 2
    assert ids["vit.layernorm.weight"] == 3
    assert ids["classifier.weight"] == 3
    # every parameter of block i has id i + 1
    for name, layer_id in ids.items():
        if ".layers." in name:
            assert layer_id == int(name.split(".layers.")[1].split(".")[0]) + 1


def test_vit_ids_on_disk_names_match_in_memory(tmp_path):
    model = ViTModel(tiny_vit(num_hidden_layers=3), add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert any(name.startswith("encoder.layer.2.attention.attention.query") for name in on_disk)  # legacy names
    assert get_layer_id("encoder.layer.2.attention.attention.query.weight", 3, "vit") == 3
    assert get_layer_id("encoder.layer.0.output.dense.bias", 3, "vit") == 1
    assert get_layer_id("layernorm.bias", 3, "vit") == 4
    # the same tensors, however named, land in the same layers
    assert _numel_per_layer(on_disk.items(), 3, "vit") == _numel_per_layer(model.named_parameters(), 3, "vit")


def test_beit_ids_including_relative_position_bias():
    model = BeitForImageClassification(tiny_beit(num_labels=3))
    ids = {name: get_layer_id(name, 2, "beit") for name, _ in model.named_parameters()}
    assert ids["beit.embeddings.cls_token"] == 0
    assert ids["beit.embeddings.mask_token"] == 0
    assert ids["beit.layers.0.lambda_1"] == 1
    assert ids["beit.layers.1.attention.q_proj.weight"] == 2
    # a table shared by all blocks sits with the head, as in BEiT
    assert ids["beit.shared_position_bias.relative_position_bias_table"] == 3
    assert ids["classifier.bias"] == 3
    assert get_layer_id("beit.encoder.layer.1.attention.attention.query.weight", 2, "beit") == 2


def test_swin_ids_count_blocks_across_stages(swin_classifier):
    ids = {name: get_layer_id(name, 3, "swin", SWIN_DEPTHS) for name, _ in swin_classifier.named_parameters()}
    assert ids["swin.embeddings.patch_embeddings.projection.weight"] == 0
    assert ids["swin.embeddings.norm.weight"] == 0
    assert ids["swin.encoder.layers.0.blocks.0.attention.q_proj.weight"] == 1
    assert ids["swin.encoder.layers.0.downsample.reduction.weight"] == 1  # merging shares the stage's last block id
    assert ids["swin.encoder.layers.1.blocks.0.mlp.fc1.weight"] == 2
    assert ids["swin.encoder.layers.1.blocks.1.attention.relative_position_bias.relative_position_bias_table"] == 3
    assert ids["swin.layernorm.weight"] == 4
    assert ids["classifier.weight"] == 4


def test_swin_ids_on_disk_names_match_in_memory(tmp_path):
    model = SwinModel(tiny_swin(), add_pooling_layer=False)
    model.save_pretrained(tmp_path)
    on_disk = load_file(str(tmp_path / "model.safetensors"))
    assert get_layer_id("encoder.layers.1.blocks.1.attention.self.query.weight", 3, "swin", SWIN_DEPTHS) == 3
    in_memory = _numel_per_layer(model.named_parameters(), 3, "swin", SWIN_DEPTHS)
    assert _numel_per_layer(on_disk.items(), 3, "swin", SWIN_DEPTHS) == in_memory
    assert set(in_memory) == {0, 1, 2, 3, 4}


def test_any_wrapper_prefix():
    assert get_layer_id("simmim.encoder.layers.1.attention.q_proj.weight", 2, "vit") == 2
    assert get_layer_id("module.model.vit.encoder.layer.0.output.dense.weight", 2, "vit") == 1
    assert get_layer_id("simmim.encoder.encoder.layers.1.blocks.0.mlp.fc1.weight", 3, "swin", SWIN_DEPTHS) == 2
    assert get_layer_id("decoder.0.weight", 2, "vit") == 3


def test_bad_names_and_structures_raise():
    with pytest.raises(ValueError, match="depths"):
        get_layer_id("swin.encoder.layers.0.blocks.0.mlp.fc1.weight", 3, "swin")
    with pytest.raises(ValueError, match="num_layers"):
        get_layer_id("vit.layers.5.mlp.fc1.weight", 2, "vit")
    with pytest.raises(ValueError, match="stage"):
        get_layer_id("swin.encoder.layers.2.blocks.0.mlp.fc1.weight", 3, "swin", SWIN_DEPTHS)


def test_param_groups_scales_and_coverage(vit_classifier):
    groups = param_groups_layer_decay(vit_classifier, base_lr=1.0, weight_decay=0.05, layer_decay=0.5)
    for group in groups:
        assert group["lr_scale"] == pytest.approx(0.5 ** (2 + 1 - group["layer_id"]))
        assert group["lr"] == pytest.approx(group["lr_scale"])
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in vit_classifier.parameters())  # each exactly once
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_param_groups_no_weight_decay_set(vit_classifier):
    groups = param_groups_layer_decay(vit_classifier, base_lr=1e-3, weight_decay=0.05)
    no_decay = {name for group in groups if group["weight_decay"] == 0.0 for name in group["names"]}
    decay = {name for group in groups if group["weight_decay"] == 0.05 for name in group["names"]}
    params = dict(vit_classifier.named_parameters())
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= no_decay
    assert all(
        params[name].ndim == 1
        for name in no_decay - {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    )
    assert decay == {name for name, p in params.items() if p.ndim > 1} - no_decay
    assert "vit.layers.0.attention.q_proj.weight" in decay and "classifier.weight" in decay


def test_swin_groups_default_decay_and_bias_tables(swin_classifier):
    groups = param_groups_layer_decay(swin_classifier, base_lr=1.0, weight_decay=0.05)
    by_id = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert default_layer_decay("swin") == 0.9
    assert by_id[2] / by_id[3] == pytest.approx(0.9)
    assert by_id[0] == pytest.approx(0.9**4)
    tables = {n for g in groups for n in g["names"] if "relative_position_bias_table" in n}
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    assert tables and tables <= no_decay
    assert "swin.encoder.layers.0.downsample.reduction.weight" not in no_decay


def test_simmim_wrapper_and_frozen_params():
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    frozen = next(name for name, _ in model.named_parameters() if "patch_embeddings.projection.weight" in name)
    dict(model.named_parameters())[frozen].requires_grad_(False)
    groups = param_groups_layer_decay(model, base_lr=1.0, weight_decay=0.05)
    layer_of = {name: g["layer_id"] for g in groups for name in g["names"]}
    assert frozen not in layer_of
    assert any("mask_token" in name and layer_id == 0 for name, layer_id in layer_of.items())
    assert all(layer_of[name] == 3 for name in layer_of if name.startswith("decoder."))
    assert max(layer_of.values()) == 3 and sorted(set(layer_of.values())) == [0, 1, 2, 3]
    assert default_layer_decay("vit") == 0.65


def test_beit_shared_bias_same_id_in_model_and_library():
    # BEiT's recipe puts the relative position bias shared by all blocks in the head's group, not the last block's.
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("beit"))
    in_memory = next(name for name, _ in model.named_parameters() if "relative_position_bias_table" in name)
    on_disk = "simmim.encoder.encoder.relative_position_bias.relative_position_bias_table"
    for name in (in_memory, on_disk):
        assert model.layer_id(name) == get_layer_id(name, 2, "beit") == model.num_layers() + 1
    groups = param_groups_layer_decay(model, base_lr=1.0, weight_decay=0.05)
    assert {g["layer_id"] for g in groups if in_memory in g["names"]} == {model.num_layers() + 1}
