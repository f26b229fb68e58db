"""The online kNN monitor (same figure as scripts/evaluate.py), its bad-input checks, feature pictures and curves."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from tiny_configs import tiny_simmim_config, tiny_swin, tiny_vit
from transformers import SwinModel, ViTModel

from simmim_hf import SimMIMForMaskedImageModeling
from simmim_hf.errors import UsageError
from simmim_hf.eval.arguments import EvaluationArguments
from simmim_hf.eval.features import extract_features, load_encoder
from simmim_hf.eval.run import run_evaluation
from simmim_hf.feature_pictures import cls_attention, last_feature_map, pca_picture, pca_rgb
from simmim_hf.pretrain.monitor import KNNMonitor, encoder_features, gather_rows, prepare_monitor_set
from simmim_hf.publish.convert import export_encoder
from simmim_hf.publish.curves import images_at_step, render_curves


def monitor_args(**overrides):
    values = dict(monitor_dataset="fashion-mnist", monitor_data_files=None, monitor_train_samples=60,
                  monitor_eval_samples=30, seed=3)  # fmt: skip
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = tiny_simmim_config("vit", num_channels=1)
    config.image_mean, config.image_std = [0.286], [0.353]
    return SimMIMForMaskedImageModeling(config).eval()


def test_monitor_figure_equals_evaluate_knn(tiny_model, tmp_path, fashion_mnist_dir):
    encoder_dir = export_encoder(tiny_model, tmp_path / "encoder")
    evaluation = run_evaluation(
        EvaluationArguments(
            model=str(encoder_dir),
            dataset_name="fashion-mnist",
            train_samples=60,
            eval_samples=30,
            seed=3,
            protocols="knn",
            device="cpu",
            update_model_card=False,
        )  # fmt: skip
    )
    expected = next(r["value"] for r in evaluation["results"] if r["protocol"] == "knn" and r["metric"] == "accuracy")
    monitor_set = prepare_monitor_set(monitor_args(), tiny_model.config)
    monitor = KNNMonitor(monitor_set, every_n_steps=0, batch_size=16)
    assert abs(monitor.measure(tiny_model) - expected) < 1e-6
    # The features themselves are evaluate.py's, from the exported encoder and its image processor.
    from simmim_hf.data.labelled import load_eval_data
    from simmim_hf.pretrain.monitor import monitor_data_spec

    data = load_eval_data(monitor_data_spec(monitor_args()))
    exported = extract_features(load_encoder(str(encoder_dir)), data.train, data.image_column, batch_size=16)
    ours = encoder_features(tiny_model, monitor_set.pixel_values[: len(data.train)], batch_size=7)
    torch.testing.assert_close(ours, exported, atol=1e-5, rtol=1e-5)


def test_sharded_rows_gather_back_in_set_order():
    """Rows `rank::world` of each rank come back in set order (single process: the gather is the identity)."""
    rows = torch.arange(7.0).unsqueeze(1)
    assert torch.equal(gather_rows(rows, 7, 1), rows)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(monitor_dataset="no-such-dataset-xyz"), "--monitor_dataset no-such-dataset-xyz:"),
        (dict(monitor_eval_samples=20000), "asked for 20000 samples but the split has only 10000"),
    ],
)
def test_bad_monitor_dataset_is_one_usage_error(tiny_model, overrides, message, fashion_mnist_dir):
    with pytest.raises(UsageError) as error:
        prepare_monitor_set(monitor_args(**overrides), tiny_model.config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_monitor_dataset_without_labels_is_refused(tiny_model, tmp_path):
    import datasets

    images = [Image.new("L", (8, 8), color=i) for i in range(4)]
    datasets.Dataset.from_dict({"image": images}).to_parquet(str(tmp_path / "train.parquet"))
    with pytest.raises(UsageError, match="label column"):
        prepare_monitor_set(
            monitor_args(monitor_dataset="parquet", monitor_data_files=[str(tmp_path / "train.parquet")]),
            tiny_model.config,
        )


def test_attention_maps_are_a_hand_computed_softmax_over_patches():
    torch.manual_seed(0)
    model = ViTModel(tiny_vit(), add_pooling_layer=False).eval()
    assert model.config._attn_implementation == "sdpa"
    pixels = torch.randn(2, 3, 32, 32)
    maps = cls_attention(model, pixels)  # (B, heads, 8, 8)
    assert maps.shape == (2, 2, 8, 8)
    assert model.config._attn_implementation == "sdpa"  # training keeps its fast kernel
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(2, 2))
    # By hand: the last block's input, its layer norm, q/k projections, softmax(q k^T / sqrt(d)) of the CLS row.
    with torch.no_grad():
        x = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        block = model.layers[-1]
        h = block.layernorm_before(x)
        heads, d = 2, 32 // 2
        q = block.attention.q_proj(h).view(2, -1, heads, d).transpose(1, 2)
        k = block.attention.k_proj(h).view(2, -1, heads, d).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[:, :, 0, 1:]
        weights = weights / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(maps, weights.reshape(2, 2, 8, 8), atol=1e-6, rtol=1e-5)


def test_pca_picture_is_deterministic_for_a_seed_and_finds_the_main_direction():
    def picture():
        torch.manual_seed(5)
        model = SwinModel(tiny_swin(), add_pooling_layer=False).eval()
        return pca_picture(model, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)), [0.5] * 3,
                           [0.5] * 3)  # fmt: skip

    assert picture().tobytes() == picture().tobytes()
    # Features varying mostly along one direction: the red channel is that coordinate, min-max scaled.
    strength = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
    direction = torch.tensor([3.0, -1.0, 0.5, 2.0]).view(1, 4, 1, 1)
    noise = 1e-3 * torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    rgb = pca_rgb(strength * direction + noise)
    assert rgb.shape == (1, 3, 4, 4) and rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(rgb[0, 0], (strength[0, 0] + 1) / 2, atol=1e-2, rtol=0)
    # Swin's tokens are laid out on the last stage's grid.
    model = SwinModel(tiny_swin(), add_pooling_layer=False).eval()
    assert last_feature_map(model, torch.randn(1, 3, 32, 32)).shape == (1, 32, 8, 8)


def test_curves_follow_images_seen_over_segments():
    segments = [
        dict(from_step=0, to_step=10, global_batch_size=4),
        dict(from_step=10, to_step=20, global_batch_size=8),
    ]
    assert [images_at_step(s, segments, 4) for s in (0, 5, 10, 15, 20)] == [0, 20, 40, 80, 120]
    summary = {"loss_curve": [[1, 0.9], [2, float("nan")], [3, 0.5]], "global_batch_size": 4}
    alone = render_curves(summary)
    monitored = render_curves({**summary, "monitor_curve": [[2, 8, 0.4], [3, 12, 0.6]],
                               "monitor": {"baselines": {"random_init": 0.2, "raw_pixels": 0.5}}})  # fmt: skip
    assert monitored.height == 2 * alone.height and monitored.width == alone.width


def test_visualize_features_on_an_exported_encoder(tiny_model, tmp_path):
    from simmim_hf.eval.visualize import main

    encoder_dir = export_encoder(tiny_model, tmp_path / "encoder")
    image = tmp_path / "a.png"
    Image.new("L", (28, 28), color=90).save(image)
    for kind in ("pca", "attention"):
        main(["--features", kind, str(encoder_dir), str(image), str(image), "--output", str(tmp_path / f"{kind}.png")])
        picture = Image.open(tmp_path / f"{kind}.png")
        rows = 2 if kind == "pca" else 1 + tiny_model.config.encoder_config.num_attention_heads
        assert picture.size == ((2 * 34 + 2) * 4, (rows * 34 + 2) * 4)
