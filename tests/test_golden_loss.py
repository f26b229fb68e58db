"""A seeded tiny SimMIM run on real images, trained by `SimMIMTrainer` (the job's path), checked against transformers.

Correctness: the reference is transformers' own `ViTForMaskedImageModeling` holding the same initial weights
(`to_transformers`), trained by a plain PyTorch loop written out below (AdamW with the official SimMIM groups:
1-D / bias / position embeddings / CLS token exempt, gradient clipping, constant LR) on the same images and masks.
Every step's loss of the Trainer run equals the reference's, step 0 included, and so do the final weights.

Regression (not correctness): the Trainer's loss curve is also compared with the one recorded in
`golden/tiny_vit_fashion_mnist.json`, so that an unintended change of initialisation, masking or the data shows.
After an intended numerical change, rewrite it with `SIMMIM_REGENERATE_GOLDEN=1 python -m pytest
tests/test_golden_loss.py` (that run writes the file and skips the comparison) and say why in the commit.
"""

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from simmim_hf.data.fashion_mnist import load_fashion_mnist
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
from simmim_hf.pretrain.trainer import SimMIMTrainer
from simmim_hf.publish.convert import to_transformers

GOLDEN = Path(__file__).parent / "golden" / "tiny_vit_fashion_mnist.json"
STEPS = 8
IMAGES = 32


def official_vit_exempt(name: str, param: torch.Tensor) -> bool:
    """microsoft/SimMIM's pretraining rule for ViT (optimizer.py): 1-D, `.bias`, or {pos_embed, cls_token}."""
    return param.ndim == 1 or name.endswith(".bias") or name.endswith(("position_embeddings", "cls_token"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(Trainer's per-step losses, reference per-step losses, Trainer-trained model, reference-trained model)."""
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset(
        "demo",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        weight_decay_exemptions="official",
    )
    model = SimMIMForMaskedImageModeling(config)
    images, _ = load_fashion_mnist("test")
    # Real images, padded 28 -> 32 px, replicated to RGB, normalised with the preset's statistics.
    pixels = torch.from_numpy(np.pad(images[:IMAGES], ((0, 0), (2, 2), (2, 2)))).float().div(255)
    pixels = ((pixels - config.image_mean[0]) / config.image_std[0]).unsqueeze(1).repeat(1, 3, 1, 1)
    masks = SimMIMMaskGenerator.from_config(config)(IMAGES, generator=torch.Generator().manual_seed(1))
    reference = to_transformers(copy.deepcopy(model)).train()  # same initial weights, before any step

    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path_factory.mktemp("golden")), max_steps=STEPS, per_device_train_batch_size=IMAGES,
        report_to="none", use_cpu=True, save_strategy="no", dataloader_num_workers=0, warmup_steps=0,
        lr_scheduler_type="constant", weight_decay=0.05, seed=0, base_learning_rate=0.048,  # 3e-3 at batch 32
    )  # fmt: skip
    trainer_losses: list[float] = []
    model.register_forward_hook(lambda module, inputs, output: trainer_losses.append(output.loss.item()))
    examples = [{"pixel_values": p, "bool_masked_pos": m} for p, m in zip(pixels, masks)]
    SimMIMTrainer(model=model, args=args, train_dataset=examples).train()

    groups = [
        {
            "params": [p for n, p in reference.named_parameters() if not official_vit_exempt(n, p)],
            "weight_decay": 0.05,
        },
        {"params": [p for n, p in reference.named_parameters() if official_vit_exempt(n, p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon
    )
    reference_losses = []
    for _ in range(STEPS):  # one batch of all images per step
        loss = reference(pixel_values=pixels, bool_masked_pos=masks).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        reference_losses.append(loss.item())
    return trainer_losses, reference_losses, model, reference


def test_step_zero_loss_equals_transformers_on_the_same_weights_and_masks(runs):
    trainer_losses, reference_losses, _, _ = runs
    assert len(trainer_losses) == STEPS
    assert trainer_losses[0] == pytest.approx(reference_losses[0], rel=1e-6)


def test_trainer_steps_follow_the_reference_loop(runs):
    trainer_losses, reference_losses, model, reference = runs
    assert trainer_losses == pytest.approx(reference_losses, rel=1e-4)
    assert trainer_losses[-1] < 0.8 * trainer_losses[0]  # it learns
    trained = to_transformers(model).state_dict()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_loss_curve_regression_against_the_recorded_curve(runs):
    """Regression only: the recorded curve came from this code, so this catches change, not error."""
    trainer_losses = runs[0]
    if os.environ.get("SIMMIM_REGENERATE_GOLDEN") == "1":
        record = {"steps": STEPS, "losses": trainer_losses, "torch": torch.__version__}
        GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
        pytest.skip(f"rewrote {GOLDEN.name}; rerun without SIMMIM_REGENERATE_GOLDEN to compare")
    assert trainer_losses == pytest.approx(json.loads(GOLDEN.read_text())["losses"], rel=2e-3)
