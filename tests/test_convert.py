import json
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_configs import tiny_simmim_config, tiny_swin, tiny_vit
from transformers import (
    DeiTConfig,
    DeiTForMaskedImageModeling,
    SwinForMaskedImageModeling,
    Swinv2Config,
    Swinv2ForMaskedImageModeling,
    ViTForMaskedImageModeling,
)

from simmim_hf import (
    SimMIMConfig,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    export_encoder,
    from_transformers,
    to_transformers,
)


def tiny_deit() -> DeiTConfig:
    return DeiTConfig(**tiny_vit().to_dict() | {"model_type": "deit"})


def tiny_swinv2() -> Swinv2Config:
    return Swinv2Config(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 2], num_heads=[2, 2], window_size=4, encoder_stride=4
    )


REFERENCES = {
    "vit": (ViTForMaskedImageModeling, tiny_vit),
    "swin": (SwinForMaskedImageModeling, tiny_swin),
    "deit": (DeiTForMaskedImageModeling, tiny_deit),  # two prefix tokens (CLS + distillation)
    "swinv2": (Swinv2ForMaskedImageModeling, tiny_swinv2),
}


def reference_model(encoder: str):
    model_class, make_config = REFERENCES[encoder]
    torch.manual_seed(0)
    model = model_class(make_config()).eval()
    with torch.no_grad():  # a non-zero mask token, so that the masking path is really compared
        getattr(model, encoder).embeddings.mask_token.normal_(std=0.5)
    return model


def inputs_for(config, batch_size=3):
    generator = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    return pixel_values, SimMIMMaskGenerator.from_config(config)(batch_size, generator=generator)


@pytest.mark.parametrize("encoder", ["vit", "swin", "deit", "swinv2"])
def test_from_transformers_matches_reference_loss_and_reconstruction(encoder):
    reference = reference_model(encoder)
    model = from_transformers(reference, mask_patch_size=8).eval()
    pixel_values, mask = inputs_for(model.config)
    assert mask.any() and not mask.all()
    with torch.no_grad():
        expected = reference(pixel_values, bool_masked_pos=mask)
        actual = model(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(actual.reconstruction, expected.reconstruction, atol=1e-5)
    assert actual.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)


@pytest.mark.parametrize("encoder", ["vit", "swin"])
def test_to_transformers_round_trip(encoder):
    model = SimMIMForMaskedImageModeling(tiny_simmim_config(encoder)).eval()
    reference = to_transformers(model).eval()
    assert type(reference) is REFERENCES[encoder][0]
    pixel_values, mask = inputs_for(model.config)
    with torch.no_grad():
        expected = model(pixel_values, bool_masked_pos=mask)
        actual = reference(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(actual.reconstruction, expected.reconstruction, atol=1e-5)
    assert actual.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)


def test_converters_reject_other_models():
    from transformers import ViTModel

    with pytest.raises(ValueError, match="model"):
        from_transformers(ViTModel(tiny_vit()))
    with pytest.raises(ValueError, match="beit"):
        to_transformers(SimMIMForMaskedImageModeling(tiny_simmim_config("beit")))


EXPORT_CHECK = """
import importlib.abc, json, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "simmim_hf":
            raise ImportError("blocked")
sys.meta_path.insert(0, _Block())
import torch
from transformers import AutoImageProcessor, AutoModel
folder = sys.argv[1]
model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
processor = AutoImageProcessor.from_pretrained(folder)
pixel_values = torch.load(folder + "/../pixels.pt", weights_only=True)
with torch.no_grad():
    hidden = model.eval()(pixel_values).last_hidden_state
torch.save(hidden, folder + "/../hidden.pt")
print(json.dumps({"class": type(model).__name__, "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
                  "mismatched": [list(map(str, m)) for m in info["mismatched_keys"]],
                  "processor": type(processor).__name__, "simmim_loaded": "simmim_hf" in sys.modules}))
"""


@pytest.mark.parametrize("encoder, stock_class", [("vit", "ViTModel"), ("swin", "SwinModel"), ("beit", "BeitModel")])
def test_export_encoder_loads_in_plain_transformers_with_same_hidden_states(tmp_path, encoder, stock_class):
    config = tiny_simmim_config(encoder)
    model = SimMIMForMaskedImageModeling(config).eval()
    folder = export_encoder(model, tmp_path / "encoder")
    pixel_values = torch.randn(2, 3, 32, 32)
    torch.save(pixel_values, tmp_path / "pixels.pt")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(EXPORT_CHECK), str(folder)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "class": stock_class,
        "missing": [],
        "unexpected": [],
        "mismatched": [],
        "processor": report["processor"],
        "simmim_loaded": False,
    }
    with torch.no_grad():
        expected = model.simmim(pixel_values).last_hidden_state
    assert torch.allclose(torch.load(tmp_path / "hidden.pt", weights_only=True), expected, atol=1e-5)


def test_exported_preprocessor_matches_pretraining_statistics(tmp_path):
    config = SimMIMConfig.from_preset("demo", hidden_size=32, num_hidden_layers=1, intermediate_size=64)
    folder = export_encoder(SimMIMForMaskedImageModeling(config), tmp_path)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == pytest.approx([0.286] * 3)
    assert processor["image_std"] == pytest.approx([0.353] * 3)
    assert processor["do_normalize"] and processor["do_rescale"]
    encoder_config = json.loads((folder / "config.json").read_text())
    assert encoder_config["model_type"] == "vit" and encoder_config["architectures"] == ["ViTModel"]
