"""Downstream evaluation: kNN, linear probe, fine-tuning, the accuracy metric, subsets, data loading, results JSON."""

import importlib.util
import json
from dataclasses import fields
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import tiny_simmim_config, tiny_swin, tiny_vit
from transformers import AutoModel, SwinModel, ViTForImageClassification, ViTImageProcessor, ViTModel

from simmim_hf import SimMIMForMaskedImageModeling
from simmim_hf.backbones import num_prefix_tokens
from simmim_hf.data.fashion_mnist import CLASS_NAMES, MEAN, STD, load_fashion_mnist
from simmim_hf.data.labelled import EvalData, class_balanced_subset, detect_columns, load_eval_data
from simmim_hf.eval.arguments import EvaluationArguments
from simmim_hf.eval.features import extract_features, load_encoder, resolve_encoder_path
from simmim_hf.eval.finetune import LayerDecayTrainer, finetune_classifier, processor_size, train_transform
from simmim_hf.eval.probes import METRIC_PATH, accuracy_results, knn_scores, linear_probe
from simmim_hf.eval.run import format_results_table, parse_args

REPO = Path(__file__).resolve().parents[1]
NUM_TRAIN, NUM_EVAL = 500, 300
CHANCE = 1 / len(CLASS_NAMES)


def _image_dataset(images: np.ndarray, labels: np.ndarray) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)


def _accuracy(scores: torch.Tensor | np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(scores).argmax(1) == labels).mean())


def _save_encoder(model: torch.nn.Module, folder: Path, size: int) -> Path:
    model.save_pretrained(folder)
    ViTImageProcessor(
        size={"height": size, "width": size}, image_mean=[MEAN] * 3, image_std=[STD] * 3
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def fmnist(fashion_mnist_dir) -> EvalData:
    """A class-balanced slice of real Fashion-MNIST: 500 training and 300 test images."""
    train_x, train_y = load_fashion_mnist("train", fashion_mnist_dir)
    test_x, test_y = load_fashion_mnist("test", fashion_mnist_dir)
    tr, te = class_balanced_subset(train_y, NUM_TRAIN, seed=0), class_balanced_subset(test_y, NUM_EVAL, seed=0)
    return EvalData(
        _image_dataset(train_x[tr], train_y[tr]),
        _image_dataset(test_x[te], test_y[te]),
        "image",
        train_y[tr],
        test_y[te],
        list(CLASS_NAMES),
        "test",
    )


@pytest.fixture(scope="module")
def pixel_features(fmnist) -> tuple[torch.Tensor, torch.Tensor]:
    encoder = load_encoder("pixels", pixel_size=28)
    return extract_features(encoder, fmnist.train, "image"), extract_features(encoder, fmnist.eval, "image")


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A stock tiny ViTModel + ViTImageProcessor folder (the form `simmim_hf.export_encoder` writes)."""
    torch.manual_seed(0)
    return _save_encoder(ViTModel(tiny_vit(), add_pooling_layer=False), tmp_path_factory.mktemp("vit"), 32)


@pytest.fixture(scope="module")
def metric():
    import evaluate

    return evaluate.load(str(METRIC_PATH), keep_in_memory=True)


# ----------------------------------------------------------------------------------------------------- kNN


def test_knn_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 6, generator=gen), torch.randn(7, 6, generator=gen)
    labels = torch.randint(0, 4, (40,), generator=gen)
    k, temperature = 5, 0.1
    expected = np.zeros((7, 4))
    for i, query in enumerate(test.numpy()):
        sims = [float(np.dot(query, row) / np.linalg.norm(query) / np.linalg.norm(row)) for row in train.numpy()]
        for j in sorted(range(40), key=lambda j: -sims[j])[:k]:
            expected[i, labels[j]] += np.exp(sims[j] / temperature)
    scores = knn_scores(train, labels, test, num_classes=4, k=k, temperature=temperature, chunk_size=3)
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-4)


def test_knn_on_raw_pixels_is_well_above_chance(fmnist, pixel_features):
    train, test = pixel_features
    scores = knn_scores(train, torch.as_tensor(fmnist.train_labels), test, num_classes=10)
    assert _accuracy(scores, fmnist.eval_labels) > 0.6  # raw-pixel kNN on Fashion-MNIST: ~0.7 here, chance 0.1


def test_knn_with_shuffled_labels_falls_to_chance(fmnist, pixel_features):
    # Control for the threshold above: without the label/feature link, the same pipeline cannot pass it.
    train, test = pixel_features
    shuffled = torch.as_tensor(np.random.default_rng(0).permutation(fmnist.train_labels))
    scores = knn_scores(train, shuffled, test, num_classes=10)
    assert _accuracy(scores, fmnist.eval_labels) < CHANCE + 0.1


# ----------------------------------------------------------------------------------------------------- linear probe


def test_linear_probe_on_raw_pixels_is_well_above_chance(fmnist, pixel_features):
    train, test = pixel_features
    logits = linear_probe(train, torch.as_tensor(fmnist.train_labels), test, num_classes=10, epochs=30)
    assert _accuracy(logits, fmnist.eval_labels) > 0.6


def test_linear_probe_with_shuffled_labels_falls_to_chance(fmnist, pixel_features):
    train, test = pixel_features
    shuffled = torch.as_tensor(np.random.default_rng(0).permutation(fmnist.train_labels))
    logits = linear_probe(train, shuffled, test, num_classes=10, epochs=30)
    assert _accuracy(logits, fmnist.eval_labels) < CHANCE + 0.1


def test_linear_probe_is_seeded():
    gen = torch.Generator().manual_seed(1)
    train, test, labels = torch.randn(64, 8, generator=gen), torch.randn(10, 8, generator=gen), torch.arange(64) % 3
    first = linear_probe(train, labels, test, num_classes=3, epochs=3, batch_size=16, seed=5)
    again = linear_probe(train, labels, test, num_classes=3, epochs=3, batch_size=16, seed=5)
    other = linear_probe(train, labels, test, num_classes=3, epochs=3, batch_size=16, seed=6)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, other)


def test_linear_probe_normalises_features_without_affine_params():
    # BatchNorm(affine=False) in front of the head: rescaling/shifting features leaves predictions unchanged.
    gen = torch.Generator().manual_seed(2)
    train, test, labels = torch.randn(96, 8, generator=gen), torch.randn(20, 8, generator=gen), torch.arange(96) % 4
    scale, shift = torch.linspace(0.5, 20, 8), torch.linspace(-3, 3, 8)
    plain = linear_probe(train, labels, test, num_classes=4, epochs=4, batch_size=32, optimizer="adamw")
    moved = linear_probe(
        train * scale + shift, labels, test * scale + shift, num_classes=4, epochs=4, batch_size=32, optimizer="adamw"
    )
    torch.testing.assert_close(plain, moved, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------- features


def test_features_mean_pool_patch_tokens_without_cls(fmnist, vit_dir):
    encoder = load_encoder(str(vit_dir))
    subset = fmnist.eval.select(range(6))
    pixel_values = encoder.processor(images=[im.convert("RGB") for im in subset["image"]], return_tensors="pt")
    with torch.no_grad():
        outputs = encoder.model(**pixel_values, output_hidden_states=True)
    last = extract_features(encoder, subset, "image", batch_size=4)
    below = extract_features(encoder, subset, "image", feature_layer=-2, batch_size=4)
    torch.testing.assert_close(last, outputs.last_hidden_state[:, 1:].mean(1))
    torch.testing.assert_close(below, outputs.hidden_states[-2][:, 1:].mean(1))
    assert not torch.allclose(last, outputs.last_hidden_state.mean(1))  # the CLS token is really left out


def test_prefix_tokens_per_architecture():
    assert num_prefix_tokens(ViTModel(tiny_vit())) == 1
    assert num_prefix_tokens(SwinModel(tiny_swin())) == 0


def test_feature_layer_out_of_range_raises(fmnist, vit_dir):
    encoder = load_encoder(str(vit_dir))
    with pytest.raises(ValueError, match="feature_layer"):
        extract_features(encoder, fmnist.eval.select(range(2)), "image", feature_layer=7)


def test_random_init_keeps_architecture_not_weights(vit_dir):
    trained, fresh = load_encoder(str(vit_dir)), load_encoder(str(vit_dir), random_init=True, seed=3)
    assert type(fresh.model) is type(trained.model) and fresh.model.config.hidden_size == 32
    a, b = trained.model.state_dict(), fresh.model.state_dict()
    assert a.keys() == b.keys()
    assert not torch.equal(
        a["embeddings.patch_embeddings.projection.weight"], b["embeddings.patch_embeddings.projection.weight"]
    )


def test_full_simmim_checkpoint_resolves_to_its_encoder(tmp_path):
    SimMIMForMaskedImageModeling(tiny_simmim_config("vit")).save_pretrained(tmp_path / "run")
    encoder_dir = resolve_encoder_path(str(tmp_path / "run"), tmp_path / "work")
    model = AutoModel.from_pretrained(encoder_dir)
    assert model.config.model_type == "vit"
    assert load_encoder(str(tmp_path / "run"), workdir=tmp_path / "work2").processor is not None


# ----------------------------------------------------------------------------------------------------- fine-tuning


def test_finetune_is_well_above_chance(fmnist, tmp_path):
    # 16px inputs and 8px patches keep this a few seconds; a few hundred steps' worth of ViT from scratch.
    config = tiny_vit(image_size=16, patch_size=8, hidden_size=64, intermediate_size=128)
    torch.manual_seed(0)
    folder = _save_encoder(ViTModel(config, add_pooling_layer=False), tmp_path / "enc", 16)
    logits = finetune_classifier(
        str(folder), fmnist, tmp_path / "out", epochs=5, batch_size=32, learning_rate=3e-3, use_cpu=True
    )
    assert logits.shape == (NUM_EVAL, 10)
    assert _accuracy(logits, fmnist.eval_labels) > 0.35  # ~0.55 here; shuffled labels give ~0.1


def test_trainer_optimizer_uses_layer_decay(tmp_path):
    from transformers import TrainingArguments

    model = ViTForImageClassification(tiny_vit(num_labels=3))
    args = TrainingArguments(
        output_dir=str(tmp_path), learning_rate=1e-2, weight_decay=0.05, use_cpu=True, report_to="none"
    )
    optimizer = LayerDecayTrainer(model=model, args=args, layer_decay=0.5).create_optimizer()
    lrs = {group["layer_id"]: group["lr"] for group in optimizer.param_groups}
    assert lrs == pytest.approx({0: 1e-2 * 0.5**3, 1: 1e-2 * 0.5**2, 2: 1e-2 * 0.5, 3: 1e-2})
    assert {group["weight_decay"] for group in optimizer.param_groups} == {0.0, 0.05}


def test_train_transform_uses_processor_size_and_stats():
    processor = ViTImageProcessor(
        size={"height": 20, "width": 20}, image_mean=[0.5, 0.4, 0.3], image_std=[0.1, 0.2, 0.25]
    )
    assert processor_size(processor) == (20, 20)
    out = train_transform(processor)(Image.new("RGB", (28, 28), (128, 128, 128)))
    assert out.shape == (3, 20, 20)
    expected = (128 / 255 - torch.tensor([0.5, 0.4, 0.3])) / torch.tensor([0.1, 0.2, 0.25])
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------- metric


def test_metric_top1_and_top5_from_scores(metric):
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0 ranked first
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # label 2 ranked fifth
            [0.6, 0.0, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 1 ranked last
        ]
    )
    assert metric.compute(predictions=scores, references=[0, 2, 1]) == {
        "accuracy": pytest.approx(1 / 3),
        "top5_accuracy": pytest.approx(2 / 3),
    }


def test_metric_class_ids_and_ranked_lists(metric):
    import evaluate

    assert metric.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 0]) == {"accuracy": 0.5}
    with pytest.raises(ValueError, match="k > 1"):
        metric.compute(predictions=[1, 0], references=[1, 1], top_k=5)
    ranked = evaluate.load(str(METRIC_PATH), "ranked", keep_in_memory=True)
    out = ranked.compute(predictions=[[3, 1, 7, 0, 2], [0, 1, 2, 3, 4]], references=[1, 9], top_k=[1, 2, 5])
    assert out == {"accuracy": 0.0, "top2_accuracy": 0.5, "top5_accuracy": 0.5}


def test_result_rows_report_top5_only_beyond_five_classes():
    labels = np.array([0, 1, 2, 3])
    kwargs = dict(protocol="knn", dataset="d", split="test", train_samples=None, seed=0)
    few = accuracy_results(np.eye(4)[[0, 1, 3, 2]], labels, **kwargs)
    many = accuracy_results(np.eye(8)[[0, 1, 3, 2]], labels, **kwargs)
    assert [(r["metric"], r["value"]) for r in few] == [("accuracy", 0.5)]
    assert [r["metric"] for r in many] == ["accuracy", "top5_accuracy"]


# ----------------------------------------------------------------------------------------------------- data


def test_class_balanced_subset():
    labels = np.repeat(np.arange(4), [50, 30, 3, 40])
    picked = class_balanced_subset(labels, 30, seed=0)
    assert len(picked) == 30 and len(set(picked.tolist())) == 30
    counts = np.bincount(labels[picked], minlength=4)
    assert counts[2] == 3  # the small class gives all it has ...
    assert counts[[0, 1, 3]].max() - counts[[0, 1, 3]].min() <= 1  # ... the others share the rest evenly
    np.testing.assert_array_equal(picked, class_balanced_subset(labels, 30, seed=0))
    assert not np.array_equal(picked, class_balanced_subset(labels, 30, seed=1))
    with pytest.raises(ValueError, match="only 123"):
        class_balanced_subset(labels, 124)


def test_detect_columns():
    features = datasets.Features(
        {"img": datasets.Image(), "fine": datasets.ClassLabel(names=["a", "b"]), "id": datasets.Value("int64")}
    )
    assert detect_columns(features, None, None) == ("img", "fine")
    two_images = datasets.Features({"a": datasets.Image(), "b": datasets.Image(), "label": datasets.Value("int64")})
    assert detect_columns(two_images, "b", None) == ("b", "label")
    with pytest.raises(ValueError, match="--image_column"):
        detect_columns(two_images, None, None)


def test_load_eval_data_from_parquet_files_with_string_labels(tmp_path):
    names = ["cat", "dog", "cat", "emu", "dog", "emu"]
    images = [Image.new("L", (8, 8), 40 * i) for i in range(6)]
    features = datasets.Features({"image": datasets.Image(), "animal": datasets.Value("string")})
    for split, rows in (("train", slice(0, 6)), ("test", slice(2, 5))):
        data = {"image": images[rows], "animal": names[rows]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    args = EvaluationArguments(
        model="pixels",
        dataset_name="parquet",
        data_files=f"train={tmp_path}/train.parquet,test={tmp_path}/test.parquet",
        label_column="animal",
        cache_dir=str(tmp_path / "cache"),
    )
    data = load_eval_data(args)
    assert data.class_names == ["cat", "dog", "emu"] and data.eval_split == "test"
    assert data.train_labels.tolist() == [0, 1, 0, 2, 1, 2] and data.eval_labels.tolist() == [0, 2, 1]


def test_load_eval_data_from_imagefolder_picks_held_out_split(tmp_path):
    for split in ("train", "validation"):
        for label, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (6, 6), colour).save(tmp_path / split / label / f"{i}.png")
    args = EvaluationArguments(
        model="pixels", dataset_name="imagefolder", data_dir=str(tmp_path), cache_dir=str(tmp_path / "c")
    )
    data = load_eval_data(args)
    assert (
        data.eval_split == "validation"
        and data.image_column == "image"
        and sorted(data.class_names) == ["blue", "red"]
    )
    assert (data.native_size, data.native_channels) == (6, 3)
    features = extract_features(load_encoder("pixels", pixel_size=6, pixel_channels=3), data.eval, "image")
    assert features.shape == (4, 3 * 6 * 6)  # colour is kept for the raw-pixel baseline
    red = data.class_names.index("red")
    assert all(
        (row[0] > row[2]) == (label == red) for row, label in zip(features.view(4, 3, -1).mean(-1), data.eval_labels)
    )


# ----------------------------------------------------------------------------------------------------- script


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_writes_results_json(vit_dir, tmp_path, capsys):
    output = tmp_path / "eval.json"
    argv = ["--model", str(vit_dir), "--protocols", "knn,linear", "--train_samples", "100", "--eval_samples", "50"]
    _script().main(argv + ["--linear_epochs", "2", "--seed", "3", "--output", str(output)])
    payload = json.loads(output.read_text())
    assert set(payload) == {"model", "dataset", "dataset_config", "split", "seed", "config", "results"}
    assert (payload["model"], payload["dataset"], payload["split"], payload["seed"]) == (
        str(vit_dir),
        "fashion-mnist",
        "test",
        3,
    )
    assert set(payload["config"]) == {f.name for f in fields(EvaluationArguments)}
    assert [(r["protocol"], r["metric"]) for r in payload["results"]] == [
        ("knn", "accuracy"),
        ("knn", "top5_accuracy"),
        ("linear", "accuracy"),
        ("linear", "top5_accuracy"),
    ]
    for row in payload["results"]:
        keys = {
            "protocol",
            "metric",
            "value",
            "dataset",
            "split",
            "train_samples",
            "seed",
            "baseline",
            "feature_layer",
        }
        assert set(row) == keys
        assert 0.0 <= row["value"] <= 1.0 and row["train_samples"] == 100 and row["seed"] == 3
        assert row["baseline"] is None and row["feature_layer"] is None
    assert format_results_table(payload["results"]) in capsys.readouterr().out


def test_script_reads_yaml_config(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("model: pixels\nprotocols: knn\ntrain_samples: 10\nfeature_layer: -2\n")
    args = parse_args([str(config)])
    assert (args.model, args.protocol_list, args.train_samples, args.feature_layer) == ("pixels", ["knn"], 10, -2)
    with pytest.raises(ValueError, match="nothing to fine-tune"):
        EvaluationArguments(model="x", raw_pixels=True, protocols="knn,finetune")


def test_script_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0 and "--feature_layer" in capsys.readouterr().out


def test_script_puts_results_into_the_runs_model_card(tmp_path):
    from huggingface_hub import ModelCard
    from tiny_configs import tiny_simmim_config

    from simmim_hf import SimMIMForMaskedImageModeling, export_encoder

    run_dir = tmp_path / "run"
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    model.save_pretrained(run_dir)
    export_encoder(model, run_dir / "encoder")
    summary = {"preset": None, "backbone": "vit", "image_size": 32, "num_channels": 3, "mask_patch_size": 8,
               "mask_ratio": 0.6, "max_steps": 1, "dataset_name": "fashion-mnist"}  # fmt: skip
    (run_dir / "simmim_run.json").write_text(json.dumps(summary))
    argv = ["--model", str(run_dir / "encoder"), "--protocols", "knn", "--train_samples", "50", "--eval_samples", "30"]
    payload = _script().main(argv)
    card = ModelCard.load(run_dir / "README.md")
    knn = next(r["value"] for r in payload["results"] if r["protocol"] == "knn" and r["metric"] == "accuracy")
    values = [result.metric_value for result in card.data.eval_results]
    assert any(abs(value - knn) < 1e-4 for value in values), (knn, values)  # the card rounds to 4 decimals


def test_every_evaluation_of_a_run_stays_in_its_card(tmp_path):
    """kNN today, the linear probe tomorrow, then a card rewrite (end of a resumed run, `write_model_card`): the card
    keeps both, and re-evaluating a protocol replaces its rows instead of adding duplicates."""
    from huggingface_hub import ModelCard
    from tiny_configs import tiny_simmim_config

    from simmim_hf import SimMIMForMaskedImageModeling, export_encoder
    from simmim_hf.publish.model_card import write_model_card
    from simmim_hf.publish.run_dir import RunDir

    run_dir = tmp_path / "run"
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    model.save_pretrained(run_dir)
    export_encoder(model, run_dir / "encoder")
    summary = {"backbone": "vit", "image_size": 32, "num_channels": 3, "max_steps": 1, "dataset_name": "fashion-mnist"}
    (run_dir / "simmim_run.json").write_text(json.dumps(summary))
    common = [
        "--model",
        str(run_dir / "encoder"),
        "--train_samples",
        "40",
        "--eval_samples",
        "20",
        "--linear_epochs",
        "2",
    ]

    def card_metrics():
        return sorted(result.metric_name for result in ModelCard.load(run_dir / "README.md").data.eval_results)

    _script().main(common + ["--protocols", "knn"])
    _script().main(common + ["--protocols", "linear"])
    after_two = card_metrics()
    assert any(name.startswith("kNN") for name in after_two) and any(name.startswith("Linear") for name in after_two)
    write_model_card(run_dir)  # re-rendered without naming any evaluation
    assert card_metrics() == after_two
    _script().main(common + ["--protocols", "knn", "--seed", "1"])  # the same protocol again: replaced, not added
    assert card_metrics() == after_two
    stored = RunDir(run_dir).read_eval_results()
    assert [(r["protocol"], r["seed"]) for r in stored["results"] if r["metric"] == "accuracy"] == [
        ("linear", 0),
        ("knn", 1),
    ]


def test_baselines_are_scored_on_the_same_subsets_and_shown_beside_the_model(tmp_path):
    """`--baselines`: random-init and raw-pixel rows for kNN and the linear probe, the very numbers separate
    `--random_init` / `--model pixels` runs give on the same subsets; the run's card shows them beside the model's
    rows, and its model-index holds the model's own only."""
    from huggingface_hub import ModelCard
    from tiny_configs import tiny_simmim_config

    from simmim_hf import SimMIMForMaskedImageModeling, export_encoder

    run_dir = tmp_path / "run"
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    model.save_pretrained(run_dir)
    export_encoder(model, run_dir / "encoder")
    summary = {"backbone": "vit", "image_size": 32, "num_channels": 3, "max_steps": 1, "dataset_name": "fashion-mnist"}
    (run_dir / "simmim_run.json").write_text(json.dumps(summary))
    common = ["--protocols", "knn,linear", "--train_samples", "40", "--eval_samples", "20", "--linear_epochs", "2"]
    encoder = ["--model", str(run_dir / "encoder")]
    payload = _script().main(encoder + common + ["--baselines", "true", "--update_model_card", "true"])
    rows = {(r["baseline"], r["protocol"], r["metric"]): r["value"] for r in payload["results"]}
    variants = (None, "random_init", "raw_pixels")
    metrics = ("accuracy", "top5_accuracy")
    assert sorted(rows, key=str) == sorted(
        [(v, p, m) for v in variants for p in ("knn", "linear") for m in metrics], key=str
    )
    for flag, baseline in ((["--random_init", "true"], "random_init"), (["--model", "pixels"], "raw_pixels")):
        alone = _script().main(encoder + common + flag + ["--update_model_card", "false"])
        assert {(r["protocol"], r["metric"]): r["value"] for r in alone["results"]} == {
            (p, m): value for (b, p, m), value in rows.items() if b == baseline
        }, baseline
    card = ModelCard.load(run_dir / "README.md")
    assert len(card.data.eval_results) == 4  # the model's kNN and linear rows, top-1 and top-5
    lines = [line for line in card.text.splitlines() if line.startswith("| ") and "kNN | top-1" in line]
    assert [line.split(" | ")[0] for line in lines] == [
        "| this encoder",
        "| random init (same architecture)",
        "| raw pixels",
    ]
    assert f"{100 * rows[('raw_pixels', 'knn', 'accuracy')]:.2f}%" in lines[2]
    assert "the resized image, flattened" in lines[2] and "`last_hidden_state`" in lines[0]
    assert "only as good as its margin over them" in card.text


def test_baselines_need_a_model_and_a_frozen_feature_protocol():
    with pytest.raises(ValueError, match="--baselines"):
        EvaluationArguments(model="pixels", baselines=True)
    with pytest.raises(ValueError, match="--baselines scores knn and linear"):
        EvaluationArguments(model="x", baselines=True, protocols="finetune")
