import json
import subprocess
import sys
import textwrap

import torch
from tiny_configs import tiny_simmim_config
from transformers import AutoConfig, AutoModel, AutoModelForMaskedImageModeling

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator, SimMIMModel

# Makes `import simmim_hf` fail in a subprocess, proving the code under test runs without the package.
BLOCK_SIMMIM = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "simmim_hf" or name.startswith("simmim_hf."):
            raise ImportError("simmim_hf is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_SIMMIM + textwrap.dedent(code)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_auto_classes_resolve_simmim(tmp_path):
    config = tiny_simmim_config("vit")
    model = SimMIMForMaskedImageModeling(config).eval()
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), SimMIMConfig)
    auto_mim = AutoModelForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert isinstance(auto_mim, SimMIMForMaskedImageModeling)
    auto_base = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(auto_base, SimMIMModel)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(auto_base(pixel_values).last_hidden_state, model.simmim(pixel_values).last_hidden_state)


def test_checkpoint_is_written_in_the_stock_on_disk_layout(tmp_path):
    from safetensors import safe_open

    SimMIMForMaskedImageModeling(tiny_simmim_config("vit")).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "simmim.encoder.encoder.layer.0.attention.attention.query.weight" in keys
    assert {"decoder.0.weight", "simmim.encoder.embeddings.mask_token"} <= keys


def test_remote_code_loads_without_simmim_hf(tmp_path):
    config = tiny_simmim_config("swin")
    model = SimMIMForMaskedImageModeling(config).eval()
    model.save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", "AutoModel", "AutoModelForMaskedImageModeling"}
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mask = SimMIMMaskGenerator.from_config(config)(2, generator=torch.Generator().manual_seed(1))
    torch.save({"x": pixel_values, "m": mask}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = model(pixel_values, bool_masked_pos=mask).loss.item()
    # The encoder-family description travels with the checkpoint (a relative import of both core files).
    core = {"configuration_simmim.py", "modeling_simmim.py", "backbones.py", "sparse_masking.py"}
    assert core <= {p.name for p in tmp_path.iterdir()}
    families = {
        "exempt": sorted(model.no_weight_decay()),
        "ids": [model.layer_id(n) for n, _ in model.named_parameters()],
    }
    out = run_python(f"""
        import json, torch
        from transformers import AutoModelForMaskedImageModeling
        model = AutoModelForMaskedImageModeling.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        backbones = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".backbones"]
        assert backbones.__file__.endswith("backbones.py") and type(model).layer_id.__globals__["get_layer_id"] is backbones.get_layer_id
        print(json.dumps({{"exempt": sorted(model.no_weight_decay()), "ids": [model.layer_id(n) for n, _ in model.named_parameters()]}}))
        with torch.no_grad():
            print(model(inputs["x"], bool_masked_pos=inputs["m"]).loss.item())
        print("simmim_hf" in sys.modules)
        """)
    remote, loss, imported = out.split("\n")[-4:-1]
    assert abs(float(loss) - expected) < 1e-6 and imported == "False"
    assert json.loads(remote) == families
