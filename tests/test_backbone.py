"""Exported Swin and BEiT encoders as multi-scale backbones of a stock dense-prediction head (UperNet)."""

from __future__ import annotations

import pytest
import torch
from tiny_configs import tiny_simmim_config
from transformers import AutoModel, UperNetConfig, UperNetForSemanticSegmentation

from simmim_hf import SimMIMForMaskedImageModeling, export_encoder
from simmim_hf.eval.dense import load_backbone

# Tiny encoders with four scales: Swin with 4 stages (strides 2, 4, 8, 16 for 2 px patches), BEiT with 4 blocks
# resampled by its FPN to 4x, 2x, 1x and 1/2x the 8x8 patch grid.
CASES = {
    "swin": (
        dict(depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2], window_size=2),
        dict(out_features=["stage1", "stage2", "stage3", "stage4"]),
        [(16, 16, 16), (32, 8, 8), (64, 4, 4), (128, 2, 2)],
        ("hidden_states_norms.",),
    ),
    "beit": (
        dict(num_hidden_layers=4),
        dict(out_indices=[1, 2, 3, 4], add_fpn=True, reshape_hidden_states=True),
        [(32, 32, 32), (32, 16, 16), (32, 8, 8), (32, 4, 4)],
        ("fpn",),
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    encoder_overrides, backbone_kwargs, shapes, new_modules = CASES[request.param]
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(tiny_simmim_config(request.param, mask_patch_size=16, **encoder_overrides))
    folder = export_encoder(model, tmp_path_factory.mktemp(request.param) / "encoder")
    return request.param, folder, backbone_kwargs, shapes, new_modules


def test_backbone_weights_are_the_encoders(exported):
    name, folder, backbone_kwargs, _, new_modules = exported
    backbone = load_backbone(folder, **backbone_kwargs)
    assert type(backbone).__name__ == {"swin": "SwinBackbone", "beit": "BeitBackbone"}[name]
    encoder = AutoModel.from_pretrained(folder).state_dict()
    weights = backbone.state_dict()
    for key, tensor in encoder.items():
        if key.startswith("pooler."):
            continue
        torch.testing.assert_close(weights[f"{name}.{key}"], tensor, rtol=0, atol=0, msg=key)
    extra = [key for key in weights if key.removeprefix(f"{name}.") not in encoder]
    assert extra and all(key.startswith(new_modules) for key in extra), extra  # only the new per-scale modules


def test_feature_maps_and_a_upernet_forward(exported):
    _, folder, backbone_kwargs, shapes, _ = exported
    backbone = load_backbone(folder, **backbone_kwargs).eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = backbone(pixel_values).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == shapes
    config = UperNetConfig(backbone_config=backbone.config, hidden_size=16, auxiliary_channels=16, num_labels=3)
    segmenter = UperNetForSemanticSegmentation(config).eval()
    segmenter.backbone.load_state_dict(backbone.state_dict())  # strict: every key of the pretrained backbone
    with torch.no_grad():
        logits = segmenter(pixel_values).logits
        again = segmenter.backbone(pixel_values).feature_maps
    assert logits.shape == (2, 3, 32, 32) and torch.isfinite(logits).all()
    for got, expected in zip(again, maps):
        torch.testing.assert_close(got, expected)


def test_a_plain_vit_export_is_refused_with_the_alternative(tmp_path):
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    folder = export_encoder(model, tmp_path / "encoder")
    with pytest.raises(ValueError, match="beit-base-patch16-224"):
        load_backbone(folder, out_indices=[1, 2])


HUB_LOAD = """
import sys, torch
from huggingface_hub import HfApi
from transformers import AutoBackbone
folder, repo, out = sys.argv[1:4]
HfApi().create_repo(repo)
HfApi().upload_folder(folder_path=folder, repo_id=repo)
backbone = AutoBackbone.from_pretrained(repo, out_features=["stage1", "stage2", "stage3", "stage4"])
torch.save({"class": type(backbone).__name__, "state": backbone.state_dict()}, out)
"""


def test_stock_autobackbone_loads_a_pushed_encoder_from_the_hub(tmp_path):
    """What `load_backbone` stands in for locally: plain `AutoBackbone.from_pretrained(repo_id)` on a Hub repo (the
    local Hub-compatible server of tests/hub_server.py)."""
    import os
    import subprocess
    import sys

    from hub_server import HubServer

    encoder_overrides, backbone_kwargs, _, _ = CASES["swin"]
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("swin", mask_patch_size=16, **encoder_overrides))
    folder = export_encoder(model, tmp_path / "encoder")
    token = "hf_" + "b" * 34
    with HubServer(users={token: ("alice", {})}) as hub:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
        env.update(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"), HF_TOKEN=token,
                   HF_HUB_DISABLE_TELEMETRY="1")  # fmt: skip
        command = [sys.executable, "-c", HUB_LOAD, str(folder), "alice/swin-simmim", str(tmp_path / "out.pt")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    local = load_backbone(folder, **backbone_kwargs).state_dict()
    assert loaded["class"] == "SwinBackbone" and loaded["state"].keys() == local.keys()
    for key, tensor in AutoModel.from_pretrained(folder).state_dict().items():
        torch.testing.assert_close(loaded["state"][f"swin.{key}"], tensor, rtol=0, atol=0)
