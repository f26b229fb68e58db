"""Golden loss curve: a seeded tiny SimMIM run on real images must reproduce the recorded losses.

Any change to masking, the model, the loss, initialisation or the optimizer groups moves this curve. After an
intended numerical change, regenerate with `SIMMIM_REGENERATE_GOLDEN=1 python -m pytest tests/test_golden_loss.py`
and say why in the commit.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.data.fashion_mnist import load_fashion_mnist
from simmim_hf.pretrain.trainer import optimizer_groups

GOLDEN = Path(__file__).parent / "golden" / "tiny_vit_fashion_mnist.json"
STEPS = 12


def seeded_run() -> list[float]:
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset(
        "demo", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    model = SimMIMForMaskedImageModeling(config)
    images, _ = load_fashion_mnist("test")
    # 32 real images, padded 28 -> 32 px, replicated to RGB, normalised with the preset's statistics.
    pixels = torch.from_numpy(np.pad(images[:32], ((0, 0), (2, 2), (2, 2)))).float().div(255)
    pixels = ((pixels - config.image_mean[0]) / config.image_std[0]).unsqueeze(1).repeat(1, 3, 1, 1)
    optimizer = torch.optim.AdamW(optimizer_groups(model, 0.05), lr=3e-3, betas=(0.9, 0.999))
    masks = SimMIMMaskGenerator.from_config(config)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        loss = model(pixels, bool_masked_pos=masks(len(pixels), generator=generator)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_seeded_tiny_run_matches_golden_loss_curve():
    losses = seeded_run()
    if os.environ.get("SIMMIM_REGENERATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"steps": STEPS, "losses": losses, "torch": torch.__version__}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert losses[-1] < 0.8 * losses[0]  # it learns
    assert losses == pytest.approx(golden, rel=2e-3)
