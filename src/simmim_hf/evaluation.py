"""Downstream evaluation of any image encoder: frozen-feature kNN and linear probe (fine-tuning is in `finetune.py`).

The encoder is anything `AutoModel.from_pretrained` takes; its preprocessing comes from the `AutoImageProcessor`
saved next to it, so other people's checkpoints work unchanged. `run_evaluation(EvaluationArguments(...))` runs the
requested protocols and returns (and optionally writes) the results JSON read by `simmim_hf.hub`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

PROTOCOLS = ("knn", "linear", "finetune")
PIXELS = "pixels"
METRIC_PATH = Path(__file__).parent / "metrics" / "accuracy.py"
# Token parameters that are prepended to the patch sequence (and left out of mean pooling), each `(1, n, dim)`.
_PREFIX_TOKENS = ("cls_token", "distillation_token", "register_tokens")


@dataclass
class EvaluationArguments:
    """Command-line arguments of `scripts/evaluate.py` (also loadable from a JSON/YAML file)."""

    model: str = field(metadata={"help": "AutoModel folder or Hub id, a full SimMIM checkpoint, or 'pixels'."})
    dataset_name: str = field(
        default="fashion-mnist",
        metadata={"help": "'fashion-mnist' (embedded), a Hub id or a builder (imagefolder, parquet, webdataset)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: str | None = field(
        default=None, metadata={"help": "For builders: 'train=a/*.parquet,test=b/*.parquet' or one path/glob."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "For builders such as imagefolder: the data folder."})
    train_split: str = field(default="train", metadata={"help": "Split the probes/fine-tuning train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split scored (default: validation, else test, else a seeded tenth of train)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when unambiguous)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when unambiguous)."})
    protocols: str = field(default="knn,linear", metadata={"help": "Comma-separated subset of knn,linear,finetune."})
    output: str | None = field(default=None, metadata={"help": "Where to write the results JSON."})
    random_init: bool = field(default=False, metadata={"help": "Same architecture with fresh weights (baseline)."})
    raw_pixels: bool = field(
        default=False, metadata={"help": "Score raw pixels as features (same as --model pixels)."}
    )
    image_processor: str | None = field(
        default=None, metadata={"help": "AutoImageProcessor to use instead of the model's."}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Raw pixels only, without --image_processor: resize side (default: native)."}
    )
    feature_layer: int | None = field(
        default=None,
        metadata={"help": "Hidden state to probe (index into hidden_states, e.g. -2); default: last_hidden_state."},
    )
    train_samples: int | None = field(default=None, metadata={"help": "Seeded class-balanced training subset size."})
    eval_samples: int | None = field(default=None, metadata={"help": "Seeded class-balanced evaluation subset size."})
    seed: int = field(default=0, metadata={"help": "Seed for subsets, probe and fine-tuning."})
    batch_size: int = field(default=64, metadata={"help": "Fine-tuning batch size."})
    eval_batch_size: int = field(default=256, metadata={"help": "Batch size of feature extraction and inference."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, mps."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN classifier."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Vote weight exp(similarity / T)."})
    linear_epochs: int = field(default=100, metadata={"help": "Linear-probe epochs (on cached features)."})
    linear_learning_rate: float = field(default=0.1, metadata={"help": "Linear-probe peak learning rate."})
    linear_optimizer: str = field(default="sgd", metadata={"help": "sgd (momentum 0.9) or adamw."})
    linear_batch_size: int = field(default=256, metadata={"help": "Linear-probe batch size."})
    linear_weight_decay: float = field(default=0.0, metadata={"help": "Linear-probe weight decay."})
    epochs: int = field(default=10, metadata={"help": "Fine-tuning epochs."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Fine-tuning peak learning rate (of the head)."})
    weight_decay: float = field(default=0.05, metadata={"help": "Fine-tuning AdamW weight decay."})
    layer_decay: float | None = field(
        default=None, metadata={"help": "Layer-wise LR decay (default 0.65 ViT/BEiT, 0.9 Swin)."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Fine-tuning label smoothing."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fine-tuning warmup, fraction of steps."})
    crop_min_scale: float = field(default=0.67, metadata={"help": "RandomResizedCrop minimum area fraction."})
    drop_path_rate: float | None = field(
        default=0.1, metadata={"help": "Stochastic depth where the model supports it."}
    )
    finetune_output_dir: str | None = field(default=None, metadata={"help": "Keep the fine-tuned classifier here."})
    cache_dir: str | None = field(default=None, metadata={"help": "datasets/transformers cache folder."})

    def __post_init__(self) -> None:
        if self.raw_pixels:
            self.model = PIXELS
        unknown = [p for p in self.protocol_list if p not in PROTOCOLS]
        if unknown or not self.protocol_list:
            raise ValueError(f"protocols must be a comma-separated subset of {PROTOCOLS}, got {self.protocols!r}")
        if self.model == PIXELS and "finetune" in self.protocol_list:
            raise ValueError("raw pixels have nothing to fine-tune; use --protocols knn,linear")
        if self.model == PIXELS and self.random_init:
            raise ValueError("--random_init needs a model, not raw pixels")
        if self.linear_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"linear_optimizer must be 'sgd' or 'adamw', got {self.linear_optimizer!r}")

    @property
    def protocol_list(self) -> list[str]:
        return [p.strip() for p in self.protocols.split(",") if p.strip()]


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------------- data

FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist")
_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
_LABEL_NAMES = ("label", "labels", "cls", "class", "target", "fine_label")
_EVAL_SPLITS = ("validation", "valid", "val", "test")


@dataclass
class EvalData:
    """Train/eval image datasets with integer labels `0..num_classes-1` kept alongside, in row order."""

    train: Any
    eval: Any
    image_column: str
    train_labels: np.ndarray
    eval_labels: np.ndarray
    class_names: list[str]
    eval_split: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def native_size(self) -> int:
        """Longest side of the first training image (the raw-pixel baseline's default resolution)."""
        return max(to_pil(self.train[0][self.image_column]).size)

    @property
    def native_channels(self) -> int:
        """1 when the first training image is greyscale, else 3 (the raw-pixel baseline's channel count)."""
        return 1 if to_pil(self.train[0][self.image_column]).mode in ("1", "L", "LA") else 3


def to_pil(image: Any, num_channels: int | None = None) -> Any:
    """Decodes an image cell (PIL, array, bytes, path or `{"bytes", "path"}`) to PIL, in mode "RGB" for 3 channels
    (greyscale is replicated) or "L" for 1 (colour is averaged); `num_channels=None` keeps the mode."""
    from PIL import Image

    from simmim_hf.transforms import decode_image

    if not isinstance(image, (Image.Image, dict, bytes, bytearray, str)):
        image = Image.fromarray(np.asarray(image))
    image = decode_image(image)  # also rescales 16-bit / float greyscale to 8 bits instead of clipping
    if num_channels is None:
        return image
    mode = "RGB" if num_channels == 3 else "L"
    return image if image.mode == mode else image.convert(mode)


def class_balanced_subset(labels: np.ndarray | list[int], num_samples: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subset of `num_samples` rows with classes as equal as the data allows.

    Per-class counts differ by at most one, except that a class with too few rows gives all it has and the others
    share its shortfall. Rows within a class, and which classes get the odd extra row, are drawn from `seed`.
    """
    labels = np.asarray(labels)
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if num_samples > len(labels):
        raise ValueError(f"asked for {num_samples} samples but the split has only {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    # Water-filling from the smallest class up: each class takes an even share of what is left, or all its rows.
    # Ties in size are ordered at random, so the odd extra rows go to random classes.
    order = sorted(classes, key=lambda c: (len(pools[c]), rng.random()))
    remaining, picked = num_samples, []
    for position, c in enumerate(order):
        take = min(len(pools[c]), remaining // (len(order) - position))
        picked.append(pools[c][:take])
        remaining -= take
    return np.sort(np.concatenate(picked))


def parse_data_files(data_files: str | None) -> str | dict[str, list[str]] | None:
    """'train=a/*.parquet,test=b/*.parquet' -> {'train': [...], 'test': [...]}; a plain path/glob passes through."""
    if not data_files or "=" not in data_files:
        return data_files
    parsed: dict[str, list[str]] = {}
    for item in data_files.split(","):
        split, _, pattern = item.partition("=")
        if not pattern:
            raise ValueError(f"bad --data_files entry {item!r}; expected split=path")
        parsed.setdefault(split.strip(), []).append(pattern.strip())
    return parsed


def detect_columns(features: Any, image_column: str | None, label_column: str | None) -> tuple[str, str]:
    """The image and label column names: given ones are checked, missing ones found by type then by name."""
    import datasets

    def pick(given: str | None, kind: type, names: tuple[str, ...], flag: str) -> str:
        if given is not None:
            if given not in features:
                raise ValueError(f"--{flag} {given!r} is not a column; columns: {list(features)}")
            return given
        found = [n for n, f in features.items() if isinstance(f, kind)] or [n for n in features if n in names]
        if len(found) != 1:
            raise ValueError(f"cannot tell the {flag.split('_')[0]} column among {list(features)}; pass --{flag}")
        return found[0]

    image = pick(image_column, datasets.Image, _IMAGE_NAMES, "image_column")
    label = pick(label_column, datasets.ClassLabel, _LABEL_NAMES, "label_column")
    if image == label:
        raise ValueError(f"image and label columns are both {image!r}")
    return image, label


def _fashion_mnist_data(args: EvaluationArguments) -> EvalData:
    """The embedded corpus, subset on the raw arrays so that only the kept images are wrapped in a Dataset."""
    import datasets

    from simmim_hf.fashion_mnist import CLASS_NAMES, load_fashion_mnist

    eval_split = args.eval_split or "test"
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASS_NAMES)})
    parts = []
    for split, samples in ((args.train_split, args.train_samples), (eval_split, args.eval_samples)):
        if split not in ("train", "test"):
            raise ValueError(f"fashion-mnist has splits 'train' and 'test', not {split!r}")
        images, labels = load_fashion_mnist(split)
        if samples is not None:
            keep = class_balanced_subset(labels, samples, args.seed)
            images, labels = images[keep], labels[keep]
        dataset = datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)
        parts += [dataset, labels]
    train, train_labels, test, eval_labels = parts
    return EvalData(train, test, "image", train_labels, eval_labels, list(CLASS_NAMES), eval_split)


def _load_splits(args: EvaluationArguments) -> tuple[Any, Any, str]:
    import datasets

    splits = datasets.load_dataset(
        args.dataset_name,
        args.dataset_config_name,
        data_files=parse_data_files(args.data_files),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
    )
    if args.train_split not in splits:
        raise ValueError(f"no split {args.train_split!r}; the dataset has {list(splits)}")
    if args.eval_split is not None:
        if args.eval_split not in splits:
            raise ValueError(f"no split {args.eval_split!r}; the dataset has {list(splits)}")
        return splits[args.train_split], splits[args.eval_split], args.eval_split
    for name in _EVAL_SPLITS:
        if name in splits and name != args.train_split:
            return splits[args.train_split], splits[name], name
    # No held-out split: carve a seeded 10% out of train (stratified when the labels are a ClassLabel).
    train = splits[args.train_split]
    _, label = detect_columns(train.features, args.image_column, args.label_column)
    stratify = label if isinstance(train.features[label], datasets.ClassLabel) else None
    parts = train.train_test_split(test_size=0.1, seed=args.seed, stratify_by_column=stratify)
    return parts["train"], parts["test"], f"{args.train_split}[heldout-10%]"


def load_eval_data(args: EvaluationArguments) -> EvalData:
    """Loads the train/eval splits, finds the columns, maps labels to ids and takes the seeded subsets."""
    import datasets

    if args.dataset_name.lower() in FASHION_MNIST_NAMES and not args.data_files:
        return _fashion_mnist_data(args)
    train, test, eval_split = _load_splits(args)
    image_column, label_column = detect_columns(train.features, args.image_column, args.label_column)
    feature = train.features[label_column]
    train_values, eval_values = list(train[label_column]), list(test[label_column])
    if isinstance(feature, datasets.ClassLabel):
        class_names = list(feature.names)
        train_labels, eval_labels = np.asarray(train_values, np.int64), np.asarray(eval_values, np.int64)
    else:  # plain ints or strings: classes are the sorted distinct training values
        class_names = sorted({str(v) for v in train_values}, key=lambda v: (len(v), v) if v.isdigit() else (0, v))
        ids = {name: i for i, name in enumerate(class_names)}
        unseen = sorted({str(v) for v in eval_values} - set(ids))
        if unseen:
            raise ValueError(f"labels {unseen[:5]} of the eval split never occur in the train split")
        train_labels = np.asarray([ids[str(v)] for v in train_values], np.int64)
        eval_labels = np.asarray([ids[str(v)] for v in eval_values], np.int64)
    if args.train_samples is not None:
        keep = class_balanced_subset(train_labels, args.train_samples, args.seed)
        train, train_labels = train.select(keep), train_labels[keep]
    if args.eval_samples is not None:
        keep = class_balanced_subset(eval_labels, args.eval_samples, args.seed)
        test, eval_labels = test.select(keep), eval_labels[keep]
    return EvalData(train, test, image_column, train_labels, eval_labels, class_names, eval_split)


# ----------------------------------------------------------------------------------------------------- encoders


@dataclass
class Encoder:
    """A feature extractor: a transformers model (or `None` for raw pixels) and its image processor."""

    model: nn.Module | None
    processor: Any
    num_channels: int
    path: str


def resolve_encoder_path(model_name_or_path: str, workdir: str | os.PathLike) -> str:
    """Returns a stock-encoder folder/id for `model_name_or_path`.

    A full SimMIM checkpoint (`model_type == "simmim"`) is turned into its encoder: `<dir>/encoder` when the
    pretraining run left one, otherwise `simmim_hf.export_encoder` into `workdir`.
    """
    from transformers import PretrainedConfig

    config_dict, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    if config_dict.get("model_type") != "simmim":
        return model_name_or_path
    exported = Path(model_name_or_path) / "encoder"
    if (exported / "config.json").is_file():
        return str(exported)
    from simmim_hf import SimMIMForMaskedImageModeling, export_encoder

    model = SimMIMForMaskedImageModeling.from_pretrained(model_name_or_path)
    return str(export_encoder(model, Path(workdir) / "encoder"))


def pixel_processor(image_size: int, num_channels: int = 1) -> Any:
    """Processor for raw-pixel features: resize to `image_size` and scale to [-1, 1]."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
    )


def load_encoder(
    model_name_or_path: str,
    random_init: bool = False,
    image_processor: str | None = None,
    pixel_size: int | None = None,
    pixel_channels: int = 1,
    seed: int = 0,
    workdir: str | os.PathLike | None = None,
) -> Encoder:
    """Loads `AutoModel` + `AutoImageProcessor` (or a raw-pixel "encoder" when `model_name_or_path == "pixels"`)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    if model_name_or_path == PIXELS:
        if image_processor is not None:
            processor = AutoImageProcessor.from_pretrained(image_processor)
        else:
            processor = pixel_processor(pixel_size or 32, num_channels=pixel_channels)
        return Encoder(None, processor, len(getattr(processor, "image_mean", [0.5])), PIXELS)
    path = resolve_encoder_path(model_name_or_path, workdir or tempfile.mkdtemp(prefix="simmim_eval_"))
    if random_init:
        config = AutoConfig.from_pretrained(path)
        torch.manual_seed(seed)
        build, source = AutoModel.from_config, config
    else:
        build, source = AutoModel.from_pretrained, path
    try:  # the pooler is never used here; leaving it out avoids a "newly initialized" report
        model = build(source, add_pooling_layer=False)
    except TypeError:  # architectures without a pooler option
        model = build(source)
    try:
        processor = AutoImageProcessor.from_pretrained(image_processor or path)
    except OSError as error:
        raise ValueError(
            f"no image processor found for {image_processor or path!r} (preprocessor_config.json); "
            "pass --image_processor with a folder or Hub id that has one"
        ) from error
    return Encoder(model.eval(), processor, int(getattr(model.config, "num_channels", 3)), path)


def num_prefix_tokens(model: nn.Module) -> int:
    """Tokens prepended before the patch tokens (CLS, distillation, registers), found from the model's parameters."""
    return sum(p.shape[-2] for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in _PREFIX_TOKENS)


def pool_tokens(hidden: torch.Tensor, prefix_tokens: int) -> torch.Tensor:
    """Mean of the patch tokens. hidden: `(B, L, D)` tokens or `(B, D, H, W)` maps -> `(B, D)`."""
    if hidden.ndim == 3:
        return hidden[:, prefix_tokens:].mean(dim=1)
    if hidden.ndim == 4:
        return hidden.mean(dim=(2, 3))
    if hidden.ndim == 2:
        return hidden
    raise ValueError(f"cannot pool a hidden state of shape {tuple(hidden.shape)}")


class _ImageCollator:
    """Turns a list of raw images into `pixel_values: (B, C, H, W)` with the processor, in the channel mode it needs."""

    def __init__(self, processor: Any, num_channels: int, image_column: str) -> None:
        self.processor, self.num_channels, self.image_column = processor, num_channels, image_column

    def __call__(self, rows: list[dict[str, Any]]) -> torch.Tensor:
        images = [to_pil(row[self.image_column], self.num_channels) for row in rows]
        return self.processor(images=images, return_tensors="pt")["pixel_values"]


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    dataset: Any,
    image_column: str,
    feature_layer: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    desc: str = "features",
) -> torch.Tensor:
    """Frozen features `(N, D)` float32 on the CPU, in dataset order.

    Models: mean of the patch tokens of `last_hidden_state` (or of `hidden_states[feature_layer]`), CLS and other
    prefix tokens excluded. Raw pixels: the flattened preprocessed image.
    """
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_ImageCollator(encoder.processor, encoder.num_channels, image_column),
    )
    model = encoder.model
    prefix = 0
    if model is not None:
        model.to(device).eval()
        prefix = num_prefix_tokens(model)
    chunks = []
    for pixel_values in tqdm(loader, desc=desc, leave=False):
        if model is None:
            chunks.append(pixel_values.flatten(1).float())
            continue
        outputs = model(pixel_values=pixel_values.to(device), output_hidden_states=feature_layer is not None)
        if feature_layer is None:
            hidden = outputs.last_hidden_state
        else:
            states = outputs.hidden_states
            if not -len(states) <= feature_layer < len(states):
                raise ValueError(f"feature_layer={feature_layer} out of range: the model returns {len(states)} states")
            hidden = states[feature_layer]
        chunks.append(pool_tokens(hidden, prefix).float().cpu())
    return torch.cat(chunks)


# ----------------------------------------------------------------------------------------------------- protocols


@torch.no_grad()
def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN votes `(M, num_classes)`: cosine similarity, the k nearest training points each vote
    `exp(similarity / temperature)` for their class.

    train_features: `(N, D)`, train_labels: `(N,)` int, test_features: `(M, D)`.
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels have different lengths")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    scores = []
    for start in range(0, test_features.shape[0], chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float().to(train.device), dim=1)
        sims, idx = (queries @ train.T).topk(k, dim=1)
        votes = torch.zeros(queries.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores).cpu()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    learning_rate: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    optimizer: str = "sgd",
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Trains `BatchNorm1d(affine=False) -> Linear` on frozen features and returns test logits `(M, num_classes)`.

    Cosine schedule with a 10% linear warmup; seeded (init and batch order), so a run is reproducible.
    """
    generator = torch.Generator().manual_seed(seed)
    dim = train_features.shape[1]
    # momentum=None: running statistics are the plain average over all training batches, so short probes are not
    # biased towards the (0, 1) initial statistics.
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
    head = nn.Sequential(norm, nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01, generator=generator)
    nn.init.zeros_(head[1].bias)
    head.to(device)
    x, y = train_features.float().to(device), train_labels.long().to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    total = epochs * steps_per_epoch
    warmup = max(1, total // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    head.train()
    for _ in tqdm(range(epochs), desc="linear probe", leave=False):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        return head(test_features.float().to(device)).cpu()


# ----------------------------------------------------------------------------------------------------- results


def load_accuracy_metric(config_name: str = "default") -> Any:
    """The project's `evaluate` accuracy metric, loaded by path (works offline)."""
    import evaluate

    return evaluate.load(str(METRIC_PATH), config_name, keep_in_memory=True)


def accuracy_results(
    scores: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    protocol: str,
    dataset: str,
    split: str,
    train_samples: int | None,
    seed: int,
) -> list[dict[str, Any]]:
    """Result rows (top-1, and top-5 when there are more than 5 classes). scores: `(M, C)`, labels: `(M,)`."""
    scores = np.asarray(scores, dtype=np.float32)
    num_classes = scores.shape[1]
    top_k = (1, 5) if num_classes > 5 else (1,)
    values = load_accuracy_metric().compute(predictions=scores, references=np.asarray(labels), top_k=top_k)
    return [
        {
            "protocol": protocol,
            "metric": metric,
            "value": float(value),
            "dataset": dataset,
            "split": split,
            "train_samples": train_samples,
            "seed": seed,
        }
        for metric, value in values.items()
    ]


def format_results_table(results: list[dict[str, Any]]) -> str:
    """A small fixed-width table of result rows."""
    header = ("protocol", "metric", "value", "train_samples", "split")
    rows = [header] + [
        (r["protocol"], r["metric"], f"{r['value']:.4f}", str(r["train_samples"] or "all"), r["split"])
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- driver


def _features_for(encoder: Encoder, data: EvalData, args: EvaluationArguments, device: torch.device) -> tuple:
    common = dict(feature_layer=args.feature_layer, batch_size=args.eval_batch_size, num_workers=args.num_workers)
    train = extract_features(encoder, data.train, data.image_column, device=device, desc="train features", **common)
    test = extract_features(encoder, data.eval, data.image_column, device=device, desc="eval features", **common)
    return train, test


def run_evaluation(args: EvaluationArguments) -> dict[str, Any]:
    """Runs the requested protocols; returns the results JSON (also written to `args.output` when set)."""
    from transformers import set_seed

    started = time.perf_counter()
    device = resolve_device(args.device)
    data = load_eval_data(args)
    print(
        f"dataset {args.dataset_name}: {len(data.train)} train / {len(data.eval)} {data.eval_split} images, "
        f"{data.num_classes} classes"
    )
    train_labels, eval_labels = torch.as_tensor(data.train_labels), torch.as_tensor(data.eval_labels)
    results: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    row = dict(dataset=args.dataset_name, split=data.eval_split, train_samples=args.train_samples, seed=args.seed)

    with tempfile.TemporaryDirectory(prefix="simmim_eval_") as workdir:
        frozen = [p for p in args.protocol_list if p in ("knn", "linear")]
        if frozen:
            tick = time.perf_counter()
            pixels = args.model == PIXELS
            encoder = load_encoder(
                args.model,
                random_init=args.random_init,
                image_processor=args.image_processor,
                pixel_size=(args.image_size or data.native_size) if pixels else None,
                pixel_channels=data.native_channels if pixels else 1,
                seed=args.seed,
                workdir=workdir,
            )
            train_features, eval_features = _features_for(encoder, data, args, device)
            timings["features"] = time.perf_counter() - tick
            print(
                f"features: {tuple(train_features.shape)} train, {tuple(eval_features.shape)} eval "
                f"({timings['features']:.1f}s)"
            )
        if "knn" in frozen:
            tick = time.perf_counter()
            scores = knn_scores(
                train_features.to(device),
                train_labels,
                eval_features,
                data.num_classes,
                k=args.knn_k,
                temperature=args.knn_temperature,
            )
            results += accuracy_results(scores, eval_labels, protocol="knn", **row)
            timings["knn"] = time.perf_counter() - tick
        if "linear" in frozen:
            tick = time.perf_counter()
            set_seed(args.seed)
            logits = linear_probe(
                train_features,
                train_labels,
                eval_features,
                data.num_classes,
                epochs=args.linear_epochs,
                learning_rate=args.linear_learning_rate,
                batch_size=args.linear_batch_size,
                weight_decay=args.linear_weight_decay,
                optimizer=args.linear_optimizer,
                seed=args.seed,
                device=device,
            )
            results += accuracy_results(logits, eval_labels, protocol="linear", **row)
            timings["linear"] = time.perf_counter() - tick
        if "finetune" in args.protocol_list:
            from simmim_hf.finetune import finetune_from_args

            tick = time.perf_counter()
            logits = finetune_from_args(args, data, workdir)
            results += accuracy_results(logits, eval_labels, protocol="finetune", **row)
            timings["finetune"] = time.perf_counter() - tick

    payload = {
        "model": args.model,
        "dataset": args.dataset_name,
        "dataset_config": args.dataset_config_name,
        "split": data.eval_split,
        "seed": args.seed,
        "config": asdict(args),
        "results": results,
    }
    print(format_results_table(results))
    timings["total"] = time.perf_counter() - started
    print("timing: " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in timings.items()))
    if args.output:
        write_results(payload, args.output)
    return payload


def write_results(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """Writes the results JSON (creating parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
