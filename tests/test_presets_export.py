"""Every preset with every kind of override exports an encoder that plain transformers loads (issue 13).

Each case builds a tiny SimMIM model from a preset plus overrides, exports the encoder, and records the encoder's
features on a fixed input. One subprocess that cannot import simmim_hf then loads every exported folder with
`AutoModel` (and `AutoBackbone` where transformers has a backbone class) and computes the same features.
"""

import json

import pytest
import torch
from test_auto_and_remote import run_python
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

from simmim_hf import PRESETS, SimMIMConfig, SimMIMForMaskedImageModeling, export_encoder

# Tiny sizes per family; every case below is applied on top of these.
TINY = {
    "plain": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
    ),
    "hierarchical": dict(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], window_size=2, image_size=64, patch_size=2
    ),
    "conv": dict(hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1], image_size=64, mask_patch_size=32),
}
# Depth 14 is more than any preset's default (12 for ViT-B/BEiT-B): its derived stage names must grow, not stay.
PLAIN_CASES = {
    "tiny": {},
    "fewer_blocks": dict(num_hidden_layers=1),
    "more_blocks": dict(num_hidden_layers=14),
    "wider": dict(hidden_size=48, num_attention_heads=3, intermediate_size=96),
    "other_image_size": dict(image_size=48),
    "greyscale": dict(num_channels=1),
    "other_patch": dict(patch_size=8, mask_patch_size=16),
}
HIERARCHICAL_CASES = {
    "tiny": {},
    "more_blocks": dict(depths=[1, 2, 3, 1]),
    "three_stages": dict(depths=[1, 1, 2], num_heads=[2, 2, 2]),
    "five_stages": dict(depths=[1, 1, 1, 1, 1], num_heads=[2, 2, 2, 2, 2]),
    "wider": dict(embed_dim=24),
    "other_image_size": dict(image_size=32),
    "greyscale": dict(num_channels=1),
    "other_window": dict(window_size=4),
    "other_patch": dict(patch_size=4),
}
CONV_CASES = {
    "tiny": {},
    "more_blocks": dict(depths=[1, 2, 1, 1]),
    "three_stages": dict(depths=[1, 1, 1], hidden_sizes=[8, 16, 16]),
    "other_image_size": dict(image_size=96),
    "greyscale": dict(num_channels=1),
}
CASES_BY_FAMILY = {"plain": PLAIN_CASES, "hierarchical": HIERARCHICAL_CASES, "conv": CONV_CASES}


def family(preset: str) -> str:
    encoder_type = SimMIMConfig.from_preset(preset).encoder_type
    if encoder_type in ("vit", "deit", "beit"):
        return "plain"
    return "conv" if encoder_type in ("convnext", "convnextv2", "resnet") else "hierarchical"


def overrides_for(preset: str, case: dict) -> dict:
    kwargs = {**TINY[family(preset)], **case}
    encoder_type = SimMIMConfig.from_preset(preset).encoder_type
    if family(preset) == "conv":
        kwargs["decoder_hidden_size"] = 16
        if encoder_type != "resnet":  # ConvNeXt: a 4 px stem, so that every stage count keeps the stride a divisor
            kwargs.update(patch_size=4, num_stages=len(kwargs["depths"]))
        else:
            kwargs["embedding_size"] = 8
    if family(preset) == "hierarchical":
        kwargs.setdefault("mask_patch_size", 16)
        if encoder_type == "swinv2":  # one pretrained window size per stage
            kwargs["pretrained_window_sizes"] = [0] * len(kwargs["depths"])
    return kwargs


CASES = [(preset, name) for preset in PRESETS for name in CASES_BY_FAMILY[family(preset)]]


def case_id(preset: str, name: str) -> str:
    return f"{preset}-{name}"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Builds and exports every case, then loads them all in one process without simmim_hf.

    Returns {case id: (config, expected features, stock report, stock features)}."""
    root = tmp_path_factory.mktemp("exports")
    manifest, expected = [], {}
    for preset, name in CASES:
        key = case_id(preset, name)
        cases = CASES_BY_FAMILY[family(preset)]
        config = SimMIMConfig.from_preset(preset, **overrides_for(preset, cases[name]))
        torch.manual_seed(0)
        model = SimMIMForMaskedImageModeling(config).eval()
        folder = export_encoder(model, root / key)
        height, width = (config.image_size, config.image_size)
        pixel_values = torch.randn(2, config.num_channels, height, width, generator=torch.Generator().manual_seed(1))
        torch.save(pixel_values, root / f"{key}.input.pt")
        with torch.no_grad():
            outputs = model.simmim.encoder(pixel_values, output_hidden_states=True)
        expected[key] = (config, outputs)
        has_backbone = config.encoder_type in MODEL_FOR_BACKBONE_MAPPING_NAMES
        manifest.append({"key": key, "folder": str(folder), "backbone": has_backbone})
    (root / "manifest.json").write_text(json.dumps(manifest))
    out = run_python(f"""
        import json, sys
        import torch
        from transformers import AutoBackbone, AutoConfig, AutoModel
        from transformers.utils import logging
        logging.disable_progress_bar()
        root = {str(root)!r}
        report = {{}}
        for case in json.load(open(root + "/manifest.json")):
            pixel_values = torch.load(root + "/" + case["key"] + ".input.pt")
            model, info = AutoModel.from_pretrained(case["folder"], output_loading_info=True)
            with torch.no_grad():
                features = {{"last_hidden_state": model.eval()(pixel_values).last_hidden_state}}
            entry = {{"class": type(model).__name__, "info": {{k: sorted(map(str, v)) for k, v in info.items()}}}}
            if case["backbone"]:
                # AutoBackbone's own class for the config: AutoBackbone.from_pretrained itself takes any path for a
                # Hub id in transformers 5.24 (hf_api().repo_exists on a local folder raises).
                backbone_class = AutoBackbone._model_mapping[type(AutoConfig.from_pretrained(case["folder"]))]
                backbone, info = backbone_class.from_pretrained(case["folder"], output_loading_info=True)
                with torch.no_grad():
                    features["feature_map"] = backbone.eval()(pixel_values).feature_maps[-1]
                entry["backbone_class"] = type(backbone).__name__
                entry["backbone_info"] = {{k: sorted(map(str, v)) for k, v in info.items()}}
                entry["out_features"] = backbone.out_features
            torch.save(features, root + "/" + case["key"] + ".stock.pt")
            report[case["key"]] = entry
        print(json.dumps(report))
        print("simmim_hf" in sys.modules)
        """)
    *_, report, imported = out.strip().splitlines()
    assert imported == "False"
    report = json.loads(report)
    return {key: (*expected[key], report[key], torch.load(root / f"{key}.stock.pt")) for key in expected}


@pytest.mark.parametrize("preset, name", CASES, ids=[case_id(*case) for case in CASES])
def test_exported_encoder_loads_in_plain_transformers(exported, preset, name):
    config, outputs, report, stock = exported[case_id(preset, name)]
    assert report["class"] == {"vit": "ViTModel", "deit": "DeiTModel", "beit": "BeitModel", "swin": "SwinModel",
                               "swinv2": "Swinv2Model", "convnext": "ConvNextModel", "convnextv2": "ConvNextV2Model",
                               "resnet": "ResNetModel"}[config.encoder_type]  # fmt: skip
    assert not any(report["info"].values()), report["info"]  # no missing, unexpected or mismatched key
    assert torch.allclose(stock["last_hidden_state"], outputs.last_hidden_state, rtol=0, atol=1e-6)
    encoder = config.encoder_config
    if "feature_map" not in stock:
        assert config.encoder_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES
        return
    # The backbone's default output is the last stage, i.e. the block that the overrides made last.
    stages = encoder.num_hidden_layers if family(preset) == "plain" else len(encoder.depths)
    assert report["out_features"] == [f"stage{stages}"]
    last = outputs.hidden_states[-1]
    if family(preset) == "conv":  # (2, C, h, w) feature maps
        info = report["backbone_info"]
        assert not info["mismatched_keys"], info
        if config.encoder_type == "resnet":  # the last stage itself
            assert not info["missing_keys"] and not info["unexpected_keys"], info
            expected = last
        else:  # through the backbone's own (fresh: weight 1, bias 0) channels-first LayerNorm, eps 1e-6
            assert info["missing_keys"] == [f"hidden_states_norms.stage{stages}.{p}" for p in ("bias", "weight")]
            assert info["unexpected_keys"] == ["layernorm.bias", "layernorm.weight"]  # the pooler's norm, as stock
            expected = torch.nn.functional.layer_norm(last.permute(0, 2, 3, 1), last.shape[1:2], eps=1e-6)
            expected = expected.permute(0, 3, 1, 2)
        assert stock["feature_map"].shape[-1] == config.image_size // config.encoder_stride
        assert torch.allclose(stock["feature_map"], expected, rtol=0, atol=1e-5)
        return
    grid = config.image_size // config.encoder_stride
    if config.encoder_type == "beit":
        assert not any(report["backbone_info"].values()), report["backbone_info"]
        expected = last[:, 1:]  # drop CLS
    else:
        # The backbone's per-stage norm is its own (fresh: weight 1, bias 0); the encoder's final norm is unused.
        info = report["backbone_info"]
        assert info["missing_keys"] == [f"hidden_states_norms.stage{stages}.{p}" for p in ("bias", "weight")], info
        assert not info["unexpected_keys"] and not info["mismatched_keys"], info
        expected = torch.nn.functional.layer_norm(last, last.shape[-1:], eps=encoder.layer_norm_eps)
    expected = expected.transpose(1, 2).reshape(2, -1, grid, grid)
    assert torch.allclose(stock["feature_map"], expected, rtol=0, atol=1e-5)


def test_cases_cover_every_preset_and_the_asked_overrides():
    assert {preset for preset, _ in CASES} == set(PRESETS)
    assert {"fewer_blocks", "more_blocks", "wider", "other_image_size", "greyscale", "other_patch"} <= set(PLAIN_CASES)
    assert {"three_stages", "more_blocks", "other_window", "other_patch", "wider"} <= set(HIERARCHICAL_CASES)
    assert {"three_stages", "more_blocks", "other_image_size", "greyscale"} <= set(CONV_CASES)
