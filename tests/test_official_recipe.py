"""Presets equal to microsoft/SimMIM: settings, initialisation, weight-decay exemptions, fine-tuning layout."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import tiny_beit, tiny_swin

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, export_encoder
from simmim_hf.eval.layer_decay import param_groups_layer_decay
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
from simmim_hf.pretrain.trainer import SimMIMTrainer

ROOT = Path(__file__).resolve().parents[1]
# Std of a standard normal truncated to [-1, 1]: sqrt(1 - 2 phi(1) / (2 Phi(1) - 1)).
_PHI1 = math.exp(-0.5) / math.sqrt(2 * math.pi)
_MASS1 = math.erf(1 / math.sqrt(2))
TRUNC1_STD = math.sqrt(1 - 2 * _PHI1 / _MASS1)


def test_preset_settings_follow_the_official_configs():
    beit = SimMIMConfig.from_preset("beit-base-patch16-224").encoder_config
    assert beit.layer_norm_eps == 1e-6 and beit.layer_scale_init_value == 0.1 and beit.drop_path_rate == 0.1
    assert beit.use_shared_relative_position_bias and not beit.use_relative_position_bias
    assert not beit.use_absolute_position_embeddings and not beit.use_mean_pooling
    for name, embed_dim, heads, window in (("swin-base-window6-192", 128, [4, 8, 16, 32], 6),):
        config = SimMIMConfig.from_preset(name)
        swin = config.encoder_config
        assert (swin.embed_dim, swin.depths, swin.num_heads, swin.window_size) == (
            embed_dim,
            [2, 2, 18, 2],
            heads,
            window,
        )
        assert swin.drop_path_rate == 0.0 and swin.image_size == 192 and not swin.use_absolute_embeddings
        assert config.initializer == "official" and config.weight_decay_exemptions == "official"
    assert SimMIMConfig.from_preset("demo").initializer == "stock"


def _official_beit_model(**overrides):
    torch.manual_seed(0)
    encoder = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, image_size=64)
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit-base-patch16-224", **{**encoder, **overrides}))


def test_beit_official_init_statistics_and_depth_rescaling():
    model = _official_beit_model()
    params = dict(model.named_parameters())
    std = 0.02 * TRUNC1_STD
    checked = 0
    for name, param in params.items():
        if not name.startswith("simmim.encoder."):
            continue
        if name.endswith(".bias"):
            assert torch.count_nonzero(param) == 0, name
        elif "layernorm" in name:
            assert torch.all(param == 1), name
        elif "lambda_" in name:
            assert torch.all(param == 0.1), name
        elif "relative_position_bias_table" in name:
            assert torch.count_nonzero(param) == 0, name
        elif param.ndim >= 2 and param.numel() >= 9000:  # Linear and patch-embedding weights
            scale = 1.0
            if name.endswith(("attention.o_proj.weight", "mlp.fc2.weight")):
                block = int(re.search(r"\.layers\.(\d+)\.", name).group(1)) + 1  # official layer_id
                scale = 1 / math.sqrt(2.0 * block)
            bound = 0.02 * scale
            assert param.abs().max() <= bound + 1e-7, name
            assert param.abs().max() > 0.95 * bound, name  # reaches the cut
            # Sampling error of a std estimate over n >= 9000 values is < 1.5 %; 5 % leaves room.
            assert abs(param.std().item() / (std * scale) - 1) < 0.05, (name, param.std().item(), std * scale)
            assert abs(param.mean().item()) < 4 * std * scale / math.sqrt(param.numel()), name
            checked += 1
    assert checked == 1 + 4 * 6  # patch embedding + (q, k, v, o, fc1, fc2) per block
    for token in ("cls_token", "mask_token"):
        value = params[f"simmim.encoder.embeddings.{token}"]
        assert 0 < value.abs().max() <= 0.02 and abs(value.std().item() / std - 1) < 0.3, token
    decoder = params["decoder.0.weight"]  # PyTorch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / math.sqrt(192)
    assert decoder.abs().max() <= bound and abs(decoder.std().item() / (bound / math.sqrt(3)) - 1) < 0.05


def test_official_init_is_deterministic_and_stock_is_an_option():
    first, second = _official_beit_model(), _official_beit_model()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    config = SimMIMConfig(encoder_config=tiny_beit(), initializer="stock")
    model = SimMIMForMaskedImageModeling(config)
    assert torch.count_nonzero(model.simmim.encoder.embeddings.cls_token) == 0  # the stock BEiT init


def test_swin_official_init_statistics():
    torch.manual_seed(0)
    config = SimMIMConfig(encoder_config=tiny_swin(embed_dim=96, depths=[2, 2], num_heads=[3, 6], window_size=8),
                          mask_patch_size=8)  # fmt: skip
    model = SimMIMForMaskedImageModeling(config)
    for name, param in model.named_parameters():
        if name.endswith(".bias") and name.startswith("simmim.") and "patch_embeddings" not in name:
            assert torch.count_nonzero(param) == 0, name
        elif "relative_position_bias_table" in name:  # 225 x 3 or 225 x 6 values
            assert abs(param.std().item() / 0.02 - 1) < 0.12, name
        elif name.endswith(("q_proj.weight", "fc1.weight", "fc2.weight")):
            assert abs(param.std().item() / 0.02 - 1) < 0.05, name
    patch = model.simmim.encoder.embeddings.patch_embeddings.projection.weight  # PyTorch default, fan_in 3*2*2
    assert patch.abs().max() <= 1 / math.sqrt(12) and patch.std() > 0.1
    assert model.simmim.encoder.embeddings.mask_token.abs().max() > 0


def _official_exempt(name, param, family):
    """The official optimizer.py rule, from its lists (ViT: pos_embed, cls_token; Swin: absolute_pos_embed,
    mask_token, keyword relative_position_bias_table), in transformers names."""
    if param.ndim == 1 or name.endswith(".bias"):
        return True
    if family == "vit":
        return name in ("simmim.encoder.embeddings.cls_token", "simmim.encoder.embeddings.position_embeddings")
    return (
        name
        in (
            "simmim.encoder.embeddings.position_embeddings",
            "simmim.encoder.embeddings.mask_token",
        )
        or "relative_position_bias_table" in name
    )


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("beit-base-patch16-224", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64)),
        ("swin-base-window6-192", dict(embed_dim=8, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 2])),
    ],
)  # fmt: skip
def test_optimizer_groups_follow_the_official_lists(tmp_path, preset, overrides):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, **overrides))
    family = "vit" if preset.startswith("beit") else "swin"
    args = SimMIMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    optimizer = SimMIMTrainer(model=model, args=args).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    expected = {n for n, p in model.named_parameters() if _official_exempt(n, p, family)}
    assert no_decay == expected
    if family == "vit":
        assert "simmim.encoder.embeddings.mask_token" not in no_decay  # decayed in the official ViT
        assert "simmim.encoder.shared_position_bias.relative_position_bias_table" not in no_decay
    else:
        assert "simmim.encoder.embeddings.mask_token" in no_decay


def test_all_tokens_exemptions_are_a_named_option():
    config = SimMIMConfig.from_preset(
        "beit-base-patch16-224", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.weight_decay_exemptions = "all-tokens"
    names = SimMIMForMaskedImageModeling(config).no_weight_decay()
    assert "simmim.encoder.embeddings.mask_token" in names
    assert "simmim.encoder.shared_position_bias.relative_position_bias_table" in names
    with pytest.raises(ValueError, match="weight_decay_exemptions"):
        SimMIMConfig(encoder_config=tiny_beit(), weight_decay_exemptions="none")


def test_finetuning_groups_follow_the_official_lists():
    from transformers import BeitForImageClassification, SwinForImageClassification

    beit = BeitForImageClassification(tiny_beit(use_relative_position_bias=True, use_shared_relative_position_bias=False,
                                                use_mean_pooling=True, use_mask_token=False, num_labels=3))  # fmt: skip
    groups = param_groups_layer_decay(beit, base_lr=1.0, weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    params = dict(beit.named_parameters())
    assert no_decay == {n for n, p in params.items() if p.ndim == 1 or n.endswith(".bias")} | {
        "beit.embeddings.cls_token"
    }
    swin = SwinForImageClassification(tiny_swin(num_labels=3))
    groups = param_groups_layer_decay(swin, base_lr=1.0, weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    params = dict(swin.named_parameters())
    expected = {
        n for n, p in params.items() if p.ndim == 1 or n.endswith(".bias") or "relative_position_bias_table" in n
    }
    assert no_decay == expected


_LOAD_WITHOUT_SIMMIM = """
import json, sys
import torch
from transformers import AutoModel
model, info = AutoModel.from_pretrained(sys.argv[1], output_loading_info=True)
assert "simmim_hf" not in sys.modules
tables = [layer.relative_position_bias.relative_position_bias_table for layer in model.layers]
shared = torch.load(sys.argv[2])
print(json.dumps({
    "report": {k: sorted(v) if not isinstance(v, list) else v for k, v in info.items()},
    "tables_equal": all(torch.equal(t, shared) for t in tables),
    "mean_pooling": model.config.use_mean_pooling,
    "shared": model.config.use_shared_relative_position_bias,
    "simmim_loaded": "simmim_hf" in sys.modules,
}))
"""


def test_beit_finetuning_export_loads_without_simmim_hf(tmp_path):
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(SimMIMConfig(encoder_config=tiny_beit()))
    shared = model.simmim.encoder.shared_position_bias.relative_position_bias_table
    with torch.no_grad():
        shared.normal_()  # a trained table, not the zero init
    torch.save(shared.detach().clone(), tmp_path / "shared.pt")
    out = export_encoder(model, tmp_path / "encoder", for_finetuning=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_SIMMIM, str(out), str(tmp_path / "shared.pt")],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(not value for value in payload["report"].values()), payload["report"]
    assert payload["tables_equal"] and payload["mean_pooling"] and not payload["shared"]
    assert not payload["simmim_loaded"]

    # Same function: the per-block layout computes the pretraining encoder's blocks (before its final norm).
    from transformers import AutoModel

    finetune = AutoModel.from_pretrained(out).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before_norm = model.simmim.eval()(pixel_values, output_hidden_states=True).hidden_states[-1]
        assert torch.allclose(finetune(pixel_values).last_hidden_state, before_norm, atol=1e-5)


def test_swin_finetuning_export_resamples_tables_like_the_official_loader(tmp_path):
    from transformers import AutoModel

    torch.manual_seed(0)
    config = SimMIMConfig(encoder_config=tiny_swin(image_size=48, window_size=3, depths=[2, 2]), mask_patch_size=8)
    model = SimMIMForMaskedImageModeling(config)
    out = export_encoder(model, tmp_path / "encoder", for_finetuning=True, image_size=56, window_size=4)
    exported = AutoModel.from_pretrained(out)
    assert exported.config.image_size == 56 and exported.config.window_size == 4
    assert json.loads((out / "preprocessor_config.json").read_text())["size"] == {"height": 56, "width": 56}
    source = dict(model.simmim.encoder.named_parameters())
    for name, table in exported.named_parameters():
        if "relative_position_bias_table" not in name:
            continue
        old = source[name]  # (25, heads): a 5x5 grid per head
        heads = old.shape[1]
        # The official loader: (L1, nH) -> (1, nH, S1, S1) -> bicubic to (S2, S2) -> (nH, L2) -> (L2, nH).
        grid = old.detach().permute(1, 0).view(1, heads, 5, 5)
        expected = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic")
        expected = expected.view(heads, 49).permute(1, 0)
        assert table.shape == (49, heads) and torch.allclose(table, expected, atol=1e-6), name
    with torch.no_grad():
        assert exported(torch.randn(1, 3, 56, 56)).last_hidden_state.shape == (1, 14 * 14, 32)


def test_evaluation_finetunes_beit_in_the_official_layout(tmp_path):
    from transformers import AutoConfig

    from simmim_hf.eval.finetune import finetuning_encoder_path

    model = SimMIMForMaskedImageModeling(SimMIMConfig(encoder_config=tiny_beit()))
    encoder = export_encoder(model, tmp_path / "encoder")
    path = finetuning_encoder_path(str(encoder), tmp_path / "work")
    config = AutoConfig.from_pretrained(path)
    assert config.use_mean_pooling and config.use_relative_position_bias
    assert not config.use_shared_relative_position_bias
    assert finetuning_encoder_path(str(encoder), tmp_path / "work", layout="as-is") == str(encoder)
