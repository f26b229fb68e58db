"""Dense-prediction protocols: the mean-IoU and mAP metrics, the generated scenes, and `scripts/evaluate.py
--protocols segmentation / detection` end to end on tiny encoders of every family with a backbone class."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import tiny_convnet_config, tiny_simmim_config
from transformers import AutoModel

from simmim_hf import SimMIMForMaskedImageModeling, export_encoder
from simmim_hf.cli import run_script
from simmim_hf.data.scenes import FOREGROUND, SEGMENTATION_CLASS_NAMES, generate_scenes, scenes_dataset
from simmim_hf.eval import run as evaluation
from simmim_hf.eval.segmentation import build_segmenter, load_mean_iou_metric
from simmim_hf.metrics.coco_map import coco_map
from simmim_hf.publish.model_card import eval_results_to_model_index

# ----------------------------------------------------------------------------------------------------- mean IoU

PRED_1 = [[0, 0, 1], [1, 2, 2]]
REF_1 = [[0, 1, 1], [255, 2, 0]]  # (1, 0) is ignored (its prediction 1 counts nowhere)


def test_mean_iou_against_a_hand_computation():
    # Counted pixels: (0,0) 0/0, (0,1) 0/1, (0,2) 1/1, (1,1) 2/2, (1,2) 2/0 (pred/ref).
    # class 0: I=1, pred 2, ref 2, U=3; class 1: I=1, pred 1, ref 2, U=2; class 2: I=1, pred 2, ref 1, U=2;
    # class 3: in neither, so NaN and out of the means.
    out = load_mean_iou_metric().compute(predictions=[PRED_1], references=[REF_1], num_labels=4, ignore_index=255)
    np.testing.assert_allclose(out["per_category_iou"][:3], [1 / 3, 1 / 2, 1 / 2])
    assert np.isnan(out["per_category_iou"][3]) and np.isnan(out["per_category_accuracy"][3])
    assert out["mean_iou"] == pytest.approx(4 / 9)
    assert out["mean_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert out["overall_accuracy"] == pytest.approx(3 / 5)


def test_mean_iou_sums_over_images_and_counts_a_class_only_predicted_as_zero():
    # A second image predicts class 3 where the reference is 0: class 3 gets U=1, I=0 (IoU 0, in the mean);
    # class 0 gets ref 3, U=4. Areas are summed over images before dividing.
    out = load_mean_iou_metric().compute(
        predictions=[PRED_1, [[3]]], references=[REF_1, [[0]]], num_labels=4, ignore_index=255
    )
    np.testing.assert_allclose(out["per_category_iou"], [1 / 4, 1 / 2, 1 / 2, 0])
    assert out["mean_iou"] == pytest.approx((1 / 4 + 1 / 2 + 1 / 2 + 0) / 4)
    assert out["mean_accuracy"] == pytest.approx((1 / 3 + 1 / 2 + 1) / 3)  # class 3 has no reference pixel
    assert out["overall_accuracy"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------------------------------- mAP


def _boxes(*rows):
    return np.asarray(rows, dtype=np.float64).reshape(-1, 4)


def test_map_of_one_box_by_hand():
    # One box, one detection of IoU 60/100 = 0.6: a hit at thresholds 0.50, 0.55, 0.60 (AP 1), a miss above (AP 0).
    out = coco_map(
        [{"boxes": _boxes([0, 0, 10, 6]), "scores": [0.9], "labels": [0]}],
        [{"boxes": _boxes([0, 0, 10, 10]), "labels": [0]}],
    )
    assert out["map"] == pytest.approx(3 / 10) and out["map_50"] == pytest.approx(1.0)


REFERENCES = [
    {"boxes": _boxes([2, 2, 20, 20], [30, 30, 15, 25], [5, 40, 10, 10]), "labels": [0, 1, 0]},
    {"boxes": _boxes([10, 10, 30, 20], [0, 0, 8, 8]), "labels": [1, 2]},
    {"boxes": _boxes([20, 5, 25, 25]), "labels": [0]},
]
PREDICTIONS = [
    {  # a good and a duplicate box of class 0, a shifted class-1 box, a class-3 box (no ground truth of class 3)
        "boxes": _boxes([3, 2, 19, 21], [2, 3, 20, 18], [33, 28, 15, 25], [5, 41, 9, 9], [0, 0, 5, 5]),
        "scores": [0.95, 0.6, 0.8, 0.3, 0.7],
        "labels": [0, 0, 1, 0, 3],
    },
    {"boxes": _boxes([12, 10, 28, 22], [40, 40, 5, 5]), "scores": [0.85, 0.4], "labels": [1, 1]},  # class 2 missed
    {"boxes": _boxes([22, 8, 22, 22], [0, 0, 50, 50]), "scores": [0.5, 0.65], "labels": [0, 0]},
]


def test_map_matches_pycocotools():
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, detections = [], [], []
    for image_id, (reference, prediction) in enumerate(zip(REFERENCES, PREDICTIONS), start=1):
        images.append({"id": image_id, "width": 64, "height": 64})
        for box, label in zip(reference["boxes"].tolist(), reference["labels"]):
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=label,
                    bbox=box,
                    area=box[2] * box[3],
                    iscrowd=0,
                )  # fmt: skip
            )
        for box, score, label in zip(prediction["boxes"].tolist(), prediction["scores"], prediction["labels"]):
            detections.append(dict(image_id=image_id, category_id=label, bbox=box, score=score))
    truth = COCO()
    truth.dataset = {"images": images, "annotations": annotations, "categories": [{"id": c} for c in range(4)]}
    truth.createIndex()
    evaluation_ = COCOeval(truth, truth.loadRes(detections), iouType="bbox")
    evaluation_.evaluate()
    evaluation_.accumulate()
    evaluation_.summarize()
    ours = coco_map(PREDICTIONS, REFERENCES, num_labels=4)
    assert 0 < ours["map"] < ours["map_50"] < 1
    assert ours["map"] == pytest.approx(evaluation_.stats[0], abs=1e-9)
    assert ours["map_50"] == pytest.approx(evaluation_.stats[1], abs=1e-9)
    assert np.isnan(ours["per_category_ap"][3]) and ours["per_category_ap"][2] == 0  # no truth / all missed


# ----------------------------------------------------------------------------------------------------- scenes


def test_scenes_are_deterministic_for_a_seed(fashion_mnist_dir):
    first, again, other = (
        generate_scenes("train", 6, seed=1),
        generate_scenes("train", 6, seed=1),
        generate_scenes("train", 6, seed=2),
    )
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["annotation"], again["annotation"])
    assert first["objects"] == again["objects"]
    assert not np.array_equal(first["image"], other["image"])
    # N scenes are the first N of a longer generation (so --train_samples N is a prefix of the split)
    assert np.array_equal(generate_scenes("train", 3, seed=1)["image"], first["image"][:3])


def test_scene_masks_match_the_pasted_items(fashion_mnist_dir):
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    items, labels = load_fashion_mnist("train")
    scenes = generate_scenes("train", 8, seed=0)
    for image, mask, objects in zip(scenes["image"], scenes["annotation"], scenes["objects"]):
        assert image.shape == mask.shape == (64, 64)
        assert np.array_equal(mask > 0, image >= FOREGROUND)  # foreground exactly where an item is visible
        assert set(np.unique(mask)) <= {0} | {c + 1 for c in objects["category"]}
        for (x, y, w, h), category, source in zip(objects["bbox"], objects["category"], objects["source_index"]):
            assert category == labels[source] and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
            outside = np.ones_like(mask, bool)
            outside[y : y + h, x : x + w] = False
            assert not (mask[outside] == category + 1).any() or objects["category"].count(category) > 1
        # The top item is wholly visible: where its resized pixels are foreground, the scene has them and the mask
        # has its class + 1 (elsewhere in its box, what lies below shows).
        (x, y, w, h), category, source = objects["bbox"][-1], objects["category"][-1], objects["source_index"][-1]
        item = items[source]
        rows, cols = np.nonzero(item)
        crop = item[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        resized = np.asarray(Image.fromarray(crop).resize((w, h), Image.BILINEAR))
        visible = resized >= FOREGROUND
        assert visible.any() and (mask[y : y + h, x : x + w][visible] == category + 1).all()
        assert np.array_equal(image[y : y + h, x : x + w][visible], resized[visible])
    dataset = scenes_dataset("test", 2, seed=0)
    assert dataset[0]["annotation"].size == dataset[0]["image"].size == (64, 64)


# ----------------------------------------------------------------------------------------------------- end to end

FAMILIES = {
    "swin": lambda: tiny_simmim_config(
        "swin", mask_patch_size=16, depths=[1, 1, 1, 1], num_heads=[2] * 4, window_size=2
    ),
    "beit": lambda: tiny_simmim_config("beit", num_hidden_layers=4),
    "convnext": lambda: tiny_convnet_config("convnext"),
    "convnextv2": lambda: tiny_convnet_config("convnextv2"),
    "resnet": lambda: tiny_convnet_config("resnet"),
    "vit": lambda: tiny_simmim_config("vit"),
}


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense-encoders")
    torch.manual_seed(0)
    return {
        name: str(export_encoder(SimMIMForMaskedImageModeling(make()), root / name)) for name, make in FAMILIES.items()
    }


TINY_RUN = [
    "--train_samples",
    "8",
    "--eval_samples",
    "4",
    "--epochs",
    "1",
    "--batch_size",
    "8",
    "--dense_hidden_size",
    "16",
]


def evaluate(encoder, tmp_path, *extra):
    output = tmp_path / "results.json"
    evaluation.main(
        ["--model", encoder, "--dataset_name", "fashion-mnist-scenes", *TINY_RUN, "--output", str(output), *extra]
    )
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def prepared_scenes(tmp_path_factory, fashion_mnist_dir):
    """`prepare_data.py --source fashion-mnist-scenes`: a save_to_disk folder of 8 scenes per split."""
    from simmim_hf.data.write_shards import main as prepare

    output = tmp_path_factory.mktemp("prepared") / "scenes"
    summary = prepare(
        ["--source", "fashion-mnist-scenes", "--output", str(output), "--max_samples", "8", "--seed", "0"]
    )
    assert summary["splits"] == {"train": 8, "test": 8} and (output / "dataset_dict.json").is_file()
    return output


def test_prepared_scenes_are_the_on_the_fly_ones(prepared_scenes):
    import datasets

    saved = datasets.load_from_disk(str(prepared_scenes))["train"]
    fresh = scenes_dataset("train", 8, seed=0)
    assert saved["objects"] == fresh["objects"]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(saved["annotation"], fresh["annotation"]))


@pytest.mark.parametrize("family", ["swin", "beit", "convnext", "convnextv2", "resnet"])
def test_segmentation_end_to_end(family, encoders, tmp_path, prepared_scenes, caplog):
    # resnet reads the folder written by prepare_data.py (any dataset with an image and a mask column); the others
    # generate the scenes on the fly.
    source = ["--dataset_name", str(prepared_scenes)] if family == "resnet" else []
    payload = evaluate(encoders[family], tmp_path, "--protocols", "segmentation", *source)
    assert "LOAD REPORT" not in caplog.text and "Loading " not in caplog.text  # the backbone's new norms are expected
    if family == "resnet":
        assert list(payload["per_class"]["segmentation"]) == [str(i) for i in range(11)]  # ids read from the masks
        return
    assert [(r["protocol"], r["metric"]) for r in payload["results"]] == [
        ("segmentation", "mean_iou"),
        ("segmentation", "mean_accuracy"),
        ("segmentation", "overall_accuracy"),
    ]
    for row in payload["results"]:
        assert 0 <= row["value"] <= 1 and row["train_samples"] == 8 and row["dataset"] == "fashion-mnist-scenes"
    assert list(payload["per_class"]["segmentation"]) == SEGMENTATION_CLASS_NAMES
    entries = eval_results_to_model_index(payload)
    assert {e.task_type for e in entries} == {"image-segmentation"} and entries[0].metric_type == "mean_iou"


def test_segmenter_carries_the_encoders_weights_unless_random_init(encoders):
    folder = encoders["convnextv2"]
    encoder = AutoModel.from_pretrained(folder).state_dict()
    pretrained = build_segmenter(folder, SEGMENTATION_CLASS_NAMES).backbone.state_dict()
    fresh = build_segmenter(folder, SEGMENTATION_CLASS_NAMES, random_init=True).backbone.state_dict()
    # Every encoder weight but its final norm and pooler (the backbone has per-stage norms instead).
    weights = [k for k in encoder if k.endswith("weight") and not k.startswith(("pooler", "layernorm"))]
    assert weights and all(torch.equal(pretrained[k], encoder[k]) for k in weights)
    assert not any(torch.equal(fresh[k], encoder[k]) for k in weights if encoder[k].ndim >= 2 and "grn" not in k)


def test_detection_end_to_end_with_random_init(encoders, tmp_path, fashion_mnist_dir):
    payload = evaluate(encoders["swin"], tmp_path, "--protocols", "detection", "--random_init")
    assert [(r["protocol"], r["metric"]) for r in payload["results"]] == [
        ("detection", "map"),
        ("detection", "map_50"),
    ]
    assert all(0 <= r["value"] <= 1 for r in payload["results"])
    assert payload["config"]["random_init"] is True
    assert {e.task_type for e in eval_results_to_model_index(payload)} == {"object-detection"}


# ----------------------------------------------------------------------------------------------------- bad input


def refused(argv, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        run_script(lambda: evaluation.main([str(a) for a in argv]))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def _saved(tmp_path, mask_size=None):
    import datasets

    rows = {"image": [np.zeros((32, 32), np.uint8)] * 2, "label": [0, 1]}
    features = {"image": datasets.Image(), "label": datasets.Value("int64")}
    if mask_size is not None:
        rows["annotation"] = [np.zeros(mask_size, np.uint8), np.zeros((32, 32), np.uint8)]
        features["annotation"] = datasets.Image()
    split = datasets.Dataset.from_dict(rows, features=datasets.Features(features))
    folder = tmp_path / "data"
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(folder))
    return folder


def test_a_dataset_without_a_mask_column_is_refused(encoders, tmp_path, capsys):
    output = tmp_path / "results.json"
    line = refused(["--model", encoders["swin"], "--dataset_name", _saved(tmp_path), "--protocols", "segmentation",
                    "--output", output], capsys)  # fmt: skip
    assert "--mask_column" in line and "no segmentation mask column" in line and not output.exists()


def test_mismatched_mask_sizes_are_refused(encoders, tmp_path, capsys):
    line = refused(["--model", encoders["swin"], "--dataset_name", _saved(tmp_path, (16, 16)),
                    "--protocols", "segmentation"], capsys)  # fmt: skip
    assert "row 0 of the train split has a 16x16 mask for a 32x32 image" in line


def test_a_plain_vit_is_refused_with_the_alternative(encoders, tmp_path, capsys):
    line = refused(["--model", encoders["vit"], "--protocols", "segmentation", "--dataset_name", "fashion-mnist-scenes"],
                   capsys)  # fmt: skip
    assert "no backbone class for a 'vit' encoder" in line and "beit-base-patch16-224" in line


def test_dense_and_classification_protocols_are_not_mixed(encoders, capsys):
    line = refused(["--model", encoders["swin"], "--protocols", "knn,segmentation"], capsys)
    assert "evaluate them apart" in line
