"""The model card (README.md) of a SimMIM pretraining run, rendered from the package's Jinja template.

The card describes the *encoder* that `export_encoder` wrote to `run_dir/encoder/`: it is what a stock
`AutoModel.from_pretrained(repo)` loads, so the metadata says `library_name: transformers` and
`pipeline_tag: image-feature-extraction`. Everything here reads JSON files only (no transformers/torch import), so
that the push script starts fast and a card can be rendered on a machine without the training stack.
"""

from __future__ import annotations

import json
import os
import re
import struct
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from simmim_hf.data.sources import FASHION_MNIST, FASHION_MNIST_HUB_ID, LOCAL_BUILDERS, is_fashion_mnist
from simmim_hf.publish.run_dir import RunDir, read_json, write_atomic

TEMPLATE_NAME = "simmim_model_card.md"
SIMMIM_ARXIV_ID = "2111.09886"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Each encoder family: (short name, paper) for the card's title and its text.
_BACKBONES = {
    "vit": ("ViT", "Dosovitskiy et al., 2021"),
    "swin": ("Swin Transformer", "Liu et al., 2021"),
    "swinv2": ("Swin Transformer V2", "Liu et al., 2022"),
    "beit": ("BEiT", "Bao et al., 2022"),
    "deit": ("DeiT", "Touvron et al., 2021"),
    "convnext": ("ConvNeXt", "Liu et al., 2022"),
    "convnextv2": ("ConvNeXt V2", "Woo et al., 2023"),
    "resnet": ("ResNet", "He et al., 2016"),
}
_LOSS_NAMES = {"l1": "L1 distance", "l2": "mean squared error", "smooth_l1": "smooth L1 (Huber) distance"}
_PROTOCOL_NAMES = {
    "knn": "kNN",
    "linear": "Linear probe",
    "finetune": "Fine-tuning",
    "segmentation": "UperNet segmentation",
    "detection": "Detection",
}
_METRIC_NAMES = {
    "accuracy": "top-1 accuracy",
    "top5_accuracy": "top-5 accuracy",
    "mean_iou": "mean IoU",
    "mean_accuracy": "mean class accuracy",
    "overall_accuracy": "pixel accuracy",
    "map": "mAP@[.5:.95]",
    "map_50": "mAP@.5",
}
# The model-index task of each protocol (classification unless listed) and its metric types.
_PROTOCOL_TASKS = {
    "segmentation": ("image-segmentation", "Image Segmentation"),
    "detection": ("object-detection", "Object Detection"),
}
_METRIC_TYPES = {"mean_iou": "mean_iou", "mean_accuracy": "accuracy", "overall_accuracy": "accuracy", "map": "map"}
_METRIC_TYPES["map_50"] = "map"
# The `baseline` of an evaluation row (eval.arguments.RANDOM_INIT / RAW_PIXELS; None: this encoder), as the card
# names it, in the order the card lists them.
_BASELINE_NAMES = {None: "this encoder", "random_init": "random init (same architecture)", "raw_pixels": "raw pixels"}
# backbones.PREFIX_TOKENS and backbones.CONV_ENCODERS, named here so that the card never imports torch (a test keeps
# them equal).
PREFIX_TOKEN_NAMES = ("cls_token", "distillation_token", "register_tokens")
CONV_TYPES = ("convnext", "convnextv2", "resnet")
# What `pooler_output` is, per family, where SimMIM leaves it untrained (its loss reads the patch tokens only).
_UNTRAINED_POOLERS = {
    "vit": "a dense layer and tanh on the CLS token, saved at its initialisation",
    "deit": "a dense layer and tanh on the CLS token, saved at its initialisation",
    "beit": "the CLS token's output, or a fresh LayerNorm over the mean of the patch tokens",
    "convnext": "a final LayerNorm over the mean of the feature map, saved at its initialisation",
    "convnextv2": "a final LayerNorm over the mean of the feature map, saved at its initialisation",
}


def hub_dataset_id(name: str | None) -> str | None:
    """The Hub dataset id that `name` (a run's `dataset_name`) refers to, or None for local data.

    The embedded Fashion-MNIST default maps to `zalando-datasets/fashion_mnist`; `owner/name` strings that are not
    folders on this machine are taken as Hub ids; local loaders, paths and URLs give None.
    """
    if not name:
        return None
    if is_fashion_mnist(name, include_hub=True):
        return FASHION_MNIST_HUB_ID
    if name.lower() in LOCAL_BUILDERS or os.path.exists(name):
        return None
    return name if _HUB_ID.match(name) else None


def _dataset_pretty_name(name: str | None) -> str:
    if is_fashion_mnist(name, include_hub=True):
        return "Fashion-MNIST"
    return name or "unknown"


_FORMAT_NAMES = {
    "webdataset": "WebDataset tar shards",
    "parquet": "parquet shards",
    "imagefolder": "an image folder",
    "arrow": "Arrow files",
}


def _backbone_name(backbone: str, with_paper: bool = False) -> str:
    """`"Swin Transformer"`, or with its paper `"Swin Transformer (Liu et al., 2021)"`; unknown types as they are."""
    if backbone not in _BACKBONES:
        return backbone
    name, paper = _BACKBONES[backbone]
    return f"{name} ({paper})" if with_paper else name


def pretraining_data(run: dict[str, Any]) -> tuple[str, str, str | None]:
    """What a run was pretrained on: `(short name, one-line description, Hub dataset id or None)`.

    A Hub id or the embedded Fashion-MNIST is named directly. Local shards (`webdataset`, `parquet`, ...) are a file
    format, not data: their source is what `prepare_data.py` recorded (`data_source` in simmim_run.json), e.g.
    Fashion-MNIST, a Hub dataset or an image folder; without a record the data is "unnamed local images".
    """
    name = run.get("dataset_name")
    source, kind = run.get("data_source"), run.get("data_source_type")
    count = run.get("num_source_images")
    stored = ""
    if name and name.lower() in LOCAL_BUILDERS:
        stored = f", read from {_FORMAT_NAMES.get(name.lower(), name + ' files')}"
    elif name:  # a Hub id, the embedded Fashion-MNIST, or a save_to_disk folder: the data itself
        source, kind = name, FASHION_MNIST if is_fashion_mnist(name, include_hub=True) else None
    hub_id = FASHION_MNIST_HUB_ID if kind == FASHION_MNIST else hub_dataset_id(source) if kind != "folder" else None
    if hub_id == FASHION_MNIST_HUB_ID:
        short = "Fashion-MNIST"
    elif hub_id:
        short = hub_id
    elif source:
        short = Path(str(source).rstrip("/")).name or str(source)
    else:
        short = "unnamed local images"
    what = "images of the folder" if kind == "folder" else "images of"
    description = f"{what} `{short}`" if not hub_id and source else short
    if count:
        description += f" ({count:,} images{stored})"
    elif stored:
        description += f" ({stored[2:]})"
    return short, description, hub_id


def eval_results_to_model_index(eval_json: dict[str, Any]) -> list[EvalResult]:
    """Converts an evaluation JSON (written by scripts/evaluate.py) into `EvalResult`s for the card's model-index.

    One `EvalResult` per entry of `eval_json["results"]` that scores this encoder (the baselines' rows, random init
    and raw pixels, are shown in the card's table but are not this model's results): task `image-classification`
    (`image-segmentation` for the segmentation protocol, `object-detection` for detection), the protocol in the
    metric name (e.g. "kNN top-1 accuracy"), the value kept in 0..1 as evaluate.py wrote it.
    """
    results = eval_json.get("results")
    if not isinstance(results, list) or not results:
        raise ValueError("the evaluation JSON has no `results` list; expected the file written by scripts/evaluate.py")
    default_dataset = eval_json.get("dataset")
    out = []
    for index, entry in enumerate(results):
        missing = [key for key in ("protocol", "metric", "value") if key not in entry]
        if missing:
            raise ValueError(f"evaluation result #{index} lacks {missing}")
        value = float(entry["value"])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"evaluation result #{index} has value {value}; evaluate.py writes fractions in [0, 1]")
        if entry.get("baseline"):
            continue
        dataset = entry.get("dataset") or default_dataset
        metric_name = f"{_PROTOCOL_NAMES.get(entry['protocol'], entry['protocol'])} "
        metric_name += _METRIC_NAMES.get(entry["metric"], entry["metric"])
        if entry.get("train_samples"):
            metric_name += f" ({entry['train_samples']} labelled train images)"
        if entry.get("feature_layer") is not None:
            metric_name += f" (features of hidden_states[{entry['feature_layer']}])"
        task_type, task_name = _PROTOCOL_TASKS.get(entry["protocol"], ("image-classification", "Image Classification"))
        out.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=hub_dataset_id(dataset) or str(dataset),
                dataset_name=_dataset_pretty_name(dataset),
                dataset_config=eval_json.get("dataset_config"),
                dataset_split=entry.get("split") or eval_json.get("split"),
                metric_type=_METRIC_TYPES.get(entry["metric"], "accuracy"),
                metric_name=metric_name,
                metric_value=round(value, 4),
            )
        )
    return out


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor entries (name -> dtype, shape, offsets) of a safetensors file's JSON header; {} when unreadable."""
    try:
        with path.open("rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
    except (OSError, ValueError, struct.error):
        return {}
    header.pop("__metadata__", None)
    return header


def _safetensors_num_parameters(path: Path) -> int | None:
    """Counts the parameters stored in a safetensors file from its JSON header (no tensor is read)."""
    header = _safetensors_header(path)
    if not header:
        return None
    total = 0
    for info in header.values():
        count = 1
        for dim in info["shape"]:
            count *= int(dim)
        total += count
    return total


def feature_code(backbone: str, weights: Path) -> tuple[str, str]:
    """The card's feature snippet: `(expression, comment)` that mean-pools `last_hidden_state` the way
    `scripts/evaluate.py` does (its patch tokens; CLS, distillation and register tokens left out; a ConvNet's map
    over its positions). The prefix tokens are counted from the weights' header, as `backbones.num_prefix_tokens`
    counts them from the parameters."""
    if backbone in CONV_TYPES:
        return "hidden.mean(dim=(2, 3))", "mean over the feature map (batch, channels, h, w)"
    prefix = sum(
        int(info["shape"][-2]) for name, info in _safetensors_header(weights).items()
        if name.rsplit(".", 1)[-1] in PREFIX_TOKEN_NAMES and len(info["shape"]) >= 2
    )  # fmt: skip
    if prefix:
        return f"hidden[:, {prefix}:].mean(dim=1)", f"mean of the patch tokens ({prefix} prefix token(s) left out)"
    return "hidden.mean(dim=1)", "mean of the patch tokens"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    seconds = int(round(float(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _format_count(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(int(value))


def _fmt(value: Any) -> str:
    if value is None or value == "":
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _hyperparameter_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The pretraining table: (name, value) pairs from simmim_run.json, "n/a" where a key is absent."""
    lr = _fmt(run.get("learning_rate"))
    if run.get("base_learning_rate") is not None:
        lr += f" (base {_fmt(run.get('base_learning_rate'))}, scaled to the global batch)"
    schedule = _fmt(run.get("lr_scheduler_type"))
    if run.get("warmup_steps") is not None:
        schedule += f", {_fmt(run.get('warmup_steps'))} warmup steps"
    batch = _fmt(run.get("global_batch_size"))
    if run.get("per_device_batch_size") is not None:
        batch += (
            f" ({run.get('per_device_batch_size')} per device x {run.get('num_processes', 1)} processes"
            f" x {run.get('gradient_accumulation_steps', 1)} accumulation steps)"
        )
    return [
        ("Preset", _fmt(run.get("preset"))),
        ("Backbone", _fmt(run.get("backbone"))),
        ("Pretraining data", pretraining_data(run)[1]),
        ("Normalisation", _normalisation_text(run)),
        ("Image size", f"{_fmt(run.get('image_size'))} px, {_fmt(run.get('num_channels'))} channels"),
        ("Mask patch size / ratio", f"{_fmt(run.get('mask_patch_size'))} px / {_fmt(run.get('mask_ratio'))}"),
        *_reconstruction_rows(run),
        ("Optimizer steps", _fmt(run.get("max_steps"))),
        ("Global batch size", batch),
        ("Images seen", _fmt(run.get("images_seen"))),
        ("Learning rate", lr),
        ("LR schedule", schedule),
        ("Weight decay", _fmt(run.get("weight_decay"))),
        ("Precision", _fmt(run.get("precision"))),
        ("Hardware", _fmt(run.get("hardware"))),
        ("Wall time", _format_duration(run.get("wall_time_seconds"))),
        ("Final reconstruction loss", _fmt(run.get("final_loss"))),
        *_data_fault_rows(run),
        *_segment_rows(run),
        (
            "Software",
            f"transformers {_fmt(run.get('transformers_version'))}, torch {_fmt(run.get('torch_version'))}, "
            f"simmim_hf {_fmt(run.get('simmim_hf_version'))}",
        ),
    ]


def _reconstruction_settings(run: dict[str, Any]) -> dict[str, Any]:
    """`conv_masking`, `decoder_type`, `decoder_hidden_size`, `decoder_depth`, `loss_type`, `norm_target` of a run:
    simmim_run.json's own keys, else its recorded config; a run from before these choices had the paper's (a linear
    head, L1 on raw pixels)."""
    config = run.get("config") or {}
    defaults = {"conv_masking": None, "decoder_type": "linear", "decoder_hidden_size": None, "decoder_depth": None,
                "loss_type": "l1", "norm_target": False}  # fmt: skip
    return {key: run.get(key, config.get(key, default)) for key, default in defaults.items()}


def _reconstruction_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """The table's rows for the masking mode (`conv_masking`, ConvNets), `decoder_type` and `loss_type` /
    `norm_target`, by their config values (the card's prose says them in words)."""
    settings = _reconstruction_settings(run)
    rows = []
    if settings["conv_masking"] is not None:
        rows.append(("Masking (conv_masking)", settings["conv_masking"]))
    decoder = str(settings["decoder_type"])
    if decoder == "conv" and settings["decoder_depth"] is not None:
        decoder += f" ({settings['decoder_depth']} block(s), width {settings['decoder_hidden_size']})"
    rows.append(("Decoder (decoder_type)", decoder))
    target = "normalised per mask cell (norm_target)" if settings["norm_target"] else "raw pixels"
    rows.append(("Loss (loss_type)", f"{settings['loss_type']}, {target}"))
    return rows


def _method(run: dict[str, Any]) -> tuple[str, str, str]:
    """How the run masked, decoded and scored, in words: `(masking, decoder, loss)` (lower-case starts)."""
    settings = _reconstruction_settings(run)
    masking = {
        "sparse": "sparse: hidden patches zeroed at the input and kept at zero after every operation that mixes "
        "positions, normalisation statistics over visible positions only; the mask token enters in the decoder",
        "token": "a learned mask token replacing the hidden patches at the stem output (dense convolutions after it)",
    }.get(settings["conv_masking"], "a learned mask token replacing the hidden patches' embeddings")
    if settings["decoder_type"] == "conv":
        depth, width = settings["decoder_depth"], settings["decoder_hidden_size"]
        blocks = f"{depth} ConvNeXt V2 block{'s' if depth != 1 else ''} of width {width}" if depth is not None else ""
        decoder = "a light convolutional decoder (" + (blocks + ", " if blocks else "")
        decoder += "its mask token filling the hidden positions, then a 1x1 convolution and a pixel shuffle)"
    else:
        decoder = "a one-layer linear head (a 1x1 convolution and a pixel shuffle)"
    target = "each hidden patch's pixels normalised by that patch's own mean and standard deviation"
    loss = _LOSS_NAMES.get(settings["loss_type"], str(settings["loss_type"])) + " to "
    loss += (target if settings["norm_target"] else "the raw pixels") + ", over the hidden pixels only"
    return masking, decoder, loss


def _data_fault_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """One row listing the data faults skipped during pretraining, when there were any."""
    faults = run.get("data_faults") or {}
    if not any(faults.values()):
        return []
    from simmim_hf.data.faults import format_counts

    return [("Skipped data (faults)", format_counts(faults))]


def _segment_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    """One row listing the run's segments when its settings changed at a resume (`--allow_changed_settings`, a
    changed file list, a raised `max_steps`): from which step to which, what changed, its global batch."""
    segments = run.get("settings_segments") or []
    if len(segments) < 2:
        return []
    parts = []
    for segment in segments:
        changed = "; ".join(
            f"{name} {_setting_text(name, before)} -> {_setting_text(name, after)}"
            for name, (before, after) in (segment.get("changed") or {}).items()
        )
        text = f"steps {segment['from_step']}-{segment['to_step']}, global batch {segment['global_batch_size']}"
        parts.append(text + (f" ({changed})" if changed else ""))
    return [("Settings by segment", "<br>".join(parts))]


def _setting_text(name: str, value: Any) -> str:
    """A recorded setting for the card: a file list by its length, the rest as `_fmt` writes it."""
    if name == "data_files" and isinstance(value, list):
        return f"{len(value)} file(s)"
    return _fmt(value)


def _normalisation_text(run: dict[str, Any]) -> str:
    if run.get("image_mean") is None:
        return "n/a"
    text = f"mean {run['image_mean']}, std {run.get('image_std')}"
    return text + (f" ({run['image_stats_source']})" if run.get("image_stats_source") else "")


def card_title(run: dict[str, Any], repo_id: str | None, backbone: str) -> str:
    """The card's title: the repository's name once pushed; before, what was pretrained on what."""
    if repo_id:
        return repo_id.split("/")[-1]
    preset = f" ({run['preset']} preset)" if run.get("preset") else ""
    return f"SimMIM {_backbone_name(backbone)}{preset} pretrained on {pretraining_data(run)[0]}"


def _features_text(entry: dict[str, Any]) -> str:
    """How a row's encoder output became what the protocol scored."""
    if entry.get("baseline") == "raw_pixels":
        return "the resized image, flattened"
    if entry["protocol"] == "finetune":
        return "whole encoder fine-tuned (`AutoModelForImageClassification`'s head)"
    layer = entry.get("feature_layer")
    return "mean of patch tokens, " + (f"`hidden_states[{layer}]`" if layer is not None else "`last_hidden_state`")


def _evaluation_rows(eval_json: dict[str, Any]) -> list[dict[str, str]]:
    """The card's evaluation table: per protocol and metric, this encoder's row first, then its baselines'."""
    order = list(_BASELINE_NAMES)
    protocols = list(_PROTOCOL_NAMES)

    def rank(entry: dict[str, Any]) -> tuple:
        protocol = entry["protocol"]
        position = protocols.index(protocol) if protocol in protocols else len(protocols)
        baseline = entry.get("baseline")
        return position, entry["metric"], order.index(baseline) if baseline in order else len(order)

    rows = []
    for entry in sorted(eval_json.get("results", []), key=rank):
        baseline = entry.get("baseline")
        rows.append(
            {
                "model": _BASELINE_NAMES.get(baseline, str(baseline)),
                "protocol": _PROTOCOL_NAMES.get(entry["protocol"], entry["protocol"]),
                "metric": _METRIC_NAMES.get(entry["metric"], entry["metric"]),
                "value": f"{100 * float(entry['value']):.2f}%",
                "features": _features_text(entry),
                "dataset": _dataset_pretty_name(entry.get("dataset") or eval_json.get("dataset")),
                "split": str(entry.get("split") or eval_json.get("split") or "n/a"),
                "train_samples": _fmt(entry.get("train_samples")) if entry.get("train_samples") else "all",
                "seed": _fmt(entry.get("seed", eval_json.get("seed"))),
            }
        )
    return rows


def _has_baselines(eval_json: dict[str, Any] | None) -> bool:
    return any(entry.get("baseline") for entry in (eval_json or {}).get("results", []))


def _size_text(size: Any) -> str:
    """32 -> "32x32"; [32, 48] -> "32x48" (height x width)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{size[0]}x{size[1]}"
    return f"{size}x{size}" if size is not None else "unknown-size"


def _load_template() -> str:
    return resources.files("simmim_hf").joinpath("templates", TEMPLATE_NAME).read_text(encoding="utf-8")


def render_model_card(
    run_dir: str | os.PathLike,
    eval_results: str | os.PathLike | dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    include_full_checkpoint: bool = False,
) -> ModelCard:
    """Renders the model card of the pretraining output in `run_dir`.

    Args:
        run_dir: a pretraining output folder (`simmim_run.json`, `encoder/`, optionally `reconstruction.png`).
        eval_results: the evaluation JSON of scripts/evaluate.py (path or loaded dict); adds a model-index.
            Default: the run's own `eval_results.json` (every evaluation evaluate.py made of it), if any.
        repo_id: the Hub repository the card is for; used in the loading snippet (a local path otherwise).
        license: SPDX-style license id of the weights, as the Hub lists them.
        include_full_checkpoint: whether the repository also holds the full SimMIM model under `simmim/`.
    """
    folder = RunDir(run_dir)
    run = folder.read_summary()
    encoder_config = folder.read_encoder_config()
    eval_json = read_json(eval_results) if isinstance(eval_results, (str, os.PathLike)) else eval_results
    if eval_json is None:  # what evaluate.py stored for this run, so re-rendering the card keeps its results
        eval_json = folder.read_eval_results()

    backbone = str(encoder_config.get("model_type") or run.get("backbone") or "vit")
    model_name = card_title(run, repo_id, backbone)
    data_name, data_description, dataset_id = pretraining_data(run)
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=["simmim", "masked-image-modeling", "vision", backbone, f"arxiv:{SIMMIM_ARXIV_ID}"],
        datasets=[dataset_id] if dataset_id else None,
        base_model=hub_base_model(run),
        model_name=model_name,
        eval_results=(eval_results_to_model_index(eval_json) or None) if eval_json else None,
    )
    weights = folder.encoder / "model.safetensors"
    features_expression, features_comment = feature_code(backbone, weights)
    architectures = encoder_config.get("architectures") or [f"{backbone} model"]
    masking, decoder, loss = _method(run)
    return ModelCard.from_template(
        card_data,
        template_str=_load_template(),
        model_title=model_name,
        repo_ref=repo_id or str(folder.encoder),
        backbone=backbone,
        backbone_name=_backbone_name(backbone, with_paper=True),
        architecture=architectures[0],
        num_parameters=_format_count(_safetensors_num_parameters(weights)),
        image_size=run.get("image_size") or encoder_config.get("image_size"),
        image_size_text=_size_text(run.get("image_size") or encoder_config.get("image_size")),
        num_channels=run.get("num_channels") or encoder_config.get("num_channels"),
        pretraining_dataset=data_name,
        pretraining_data_description=data_description,
        pretraining_dataset_id=dataset_id,
        pushed=bool(repo_id),
        is_fashion_mnist=dataset_id == FASHION_MNIST_HUB_ID,
        hyperparameters=_hyperparameter_rows(run),
        has_reconstruction=folder.reconstruction.is_file(),
        reconstruction_file=RunDir.RECONSTRUCTION_NAME,
        has_pca=folder.pca_picture.is_file(),
        pca_file=RunDir.PCA_NAME,
        has_attention=folder.attention_picture.is_file(),
        attention_file=RunDir.ATTENTION_NAME,
        has_curves=folder.curves.is_file(),
        curves_file=RunDir.CURVES_NAME,
        monitor=run.get("monitor"),
        monitor_final=_fmt((run.get("monitor") or {}).get("final_knn_top1")),
        monitor_random=_fmt(((run.get("monitor") or {}).get("baselines") or {}).get("random_init")),
        monitor_pixels=_fmt(((run.get("monitor") or {}).get("baselines") or {}).get("raw_pixels")),
        mask_ratio=run.get("mask_ratio"),
        is_convnet=backbone in CONV_TYPES,
        conv_masking=_reconstruction_settings(run)["conv_masking"],
        masking_text=masking,
        decoder_text=decoder,
        loss_text=loss,
        evaluation_rows=_evaluation_rows(eval_json) if eval_json else [],
        has_baselines=_has_baselines(eval_json),
        features_expression=features_expression,
        features_comment=features_comment,
        untrained_pooler=_UNTRAINED_POOLERS.get(backbone),
        include_full_checkpoint=include_full_checkpoint,
        base_model_id=hub_base_model(run),
        base_model_local=None if hub_base_model(run) else run.get("base_model"),
        simmim_arxiv_id=SIMMIM_ARXIV_ID,
    )


def write_model_card(
    run_dir: str | os.PathLike,
    eval_results: str | os.PathLike | dict[str, Any] | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    include_full_checkpoint: bool = False,
) -> Path:
    """Renders the card (see `render_model_card`) and saves it as the run's `README.md`; returns that path."""
    card = render_model_card(
        run_dir,
        eval_results=eval_results,
        repo_id=repo_id,
        license=license,
        include_full_checkpoint=include_full_checkpoint,
    )
    path = RunDir(run_dir).card
    write_atomic(path, str(card))  # a kill or a full disk leaves the old card (or none), never a cut one
    return path


def hub_base_model(run: dict[str, Any]) -> str | None:
    """The run's starting model when it names a Hub repository; a local folder (which readers of the card cannot
    open, and which the Hub's `base_model` metadata would misread as a repo id) gets None."""
    base = run.get("base_model")
    if not base or Path(base).exists() or base.startswith((".", "/", "~")) or base.count("/") != 1:
        return None
    return base
