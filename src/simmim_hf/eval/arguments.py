"""Arguments of downstream evaluation (`scripts/evaluate.py`): the protocols and every setting, as one dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from simmim_hf.data.scenes import FASHION_MNIST_SCENES, is_fashion_mnist_scenes
from simmim_hf.data.sources import DATA_FILES_HELP, FASHION_MNIST, normalize_source


def normalize_dense_source(name: str) -> str:
    """`fashion-mnist-scenes` for every alias of the generated scenes, else `name` itself."""
    return FASHION_MNIST_SCENES if is_fashion_mnist_scenes(name) else name


CLASSIFICATION_PROTOCOLS = ("knn", "linear", "finetune")
# Dense-prediction protocols (`eval/segmentation.py`, `eval/detection.py`): their own data (masks or boxes), so they
# run in an evaluation of their own, not beside the classification ones.
DENSE_PROTOCOLS = ("segmentation", "detection")
PROTOCOLS = CLASSIFICATION_PROTOCOLS + DENSE_PROTOCOLS
# `--model pixels`: score the preprocessed pixels themselves (a baseline).
PIXELS = "pixels"
# The `baseline` of a result row: None for the model itself, else what was scored in its place.
RANDOM_INIT, RAW_PIXELS = "random_init", "raw_pixels"
# The protocols `--baselines` scores the baselines with (frozen features; fine-tuning a random init is a separate run).
BASELINE_PROTOCOLS = ("knn", "linear")


@dataclass
class EvaluationArguments:
    """Command-line arguments of `scripts/evaluate.py` (also loadable from a JSON/YAML file)."""

    model: str = field(metadata={"help": "AutoModel folder or Hub id, a full SimMIM checkpoint, or 'pixels'."})
    dataset_name: str = field(
        default=FASHION_MNIST,
        metadata={
            "help": "'fashion-mnist' (embedded; also `fashion_mnist`), 'fashion-mnist-scenes' (embedded scenes with "
            "masks and boxes, for segmentation/detection), a Hub id or a builder (imagefolder, parquet, webdataset)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": DATA_FILES_HELP})
    data_dir: str | None = field(default=None, metadata={"help": "For builders such as imagefolder: the data folder."})
    train_split: str = field(default="train", metadata={"help": "Split the probes/fine-tuning train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Split scored (default: validation, else test, else a seeded tenth of train)."}
    )
    image_column: str | None = field(default=None, metadata={"help": "Image column (detected when unambiguous)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (detected when unambiguous)."})
    protocols: str = field(
        default="knn,linear",
        metadata={"help": "Comma-separated subset of knn,linear,finetune, or of segmentation,detection."},
    )
    mask_column: str | None = field(
        default=None, metadata={"help": "Segmentation: the mask column (detected: annotation, mask, ...)."}
    )
    objects_column: str | None = field(
        default=None, metadata={"help": "Detection: the column of {bbox: [[x, y, w, h], ...], category: [...]}."}
    )
    num_labels: int | None = field(
        default=None, metadata={"help": "Dense protocols: number of classes (default: from the data)."}
    )
    ignore_index: int = field(default=255, metadata={"help": "Segmentation: mask value left out of loss and score."})
    reduce_labels: bool = field(
        default=False,
        metadata={"help": "Segmentation: mask 0 is ignored and other ids shift down by one (scene_parse_150)."},
    )
    dense_hidden_size: int = field(
        default=128, metadata={"help": "Dense protocols: width of the UperNet / detection head."}
    )
    output: str | None = field(default=None, metadata={"help": "Where to write the results JSON."})
    random_init: bool = field(default=False, metadata={"help": "Same architecture with fresh weights (baseline)."})
    update_model_card: bool = field(
        default=True,
        metadata={
            "help": "When --model is a pretraining run (or its encoder/), write the results into its README.md."
        },
    )
    raw_pixels: bool = field(
        default=False, metadata={"help": "Score raw pixels as features (same as --model pixels)."}
    )
    baselines: bool = field(
        default=False,
        metadata={
            "help": "Also score the baselines with the same kNN / linear protocol on the same subsets: the same "
            "architecture at random init, and raw pixels (rows marked `baseline` in the results and the card)."
        },
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
        default=None, metadata={"help": "Layer-wise LR decay (default 0.65 ViT/BEiT, 0.9 Swin and ConvNets)."}
    )
    label_smoothing: float = field(default=0.1, metadata={"help": "Fine-tuning label smoothing."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fine-tuning warmup, fraction of steps."})
    crop_min_scale: float = field(default=0.67, metadata={"help": "RandomResizedCrop minimum area fraction."})
    drop_path_rate: float | None = field(
        default=0.1, metadata={"help": "Stochastic depth where the model supports it."}
    )
    finetune_output_dir: str | None = field(default=None, metadata={"help": "Keep the fine-tuned classifier here."})
    finetune_layout: str = field(
        default="official",
        metadata={
            "help": "official: fine-tune a BEiT encoder in microsoft/SimMIM's fine-tuning layout (mean pooling, one "
            "relative position table per block copied from the shared one); as-is: the encoder as exported."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "datasets/transformers cache folder."})

    def __post_init__(self) -> None:
        self.dataset_name = normalize_dense_source(
            normalize_source(self.dataset_name)
        )  # every alias is one dataset in the results JSON
        if self.raw_pixels:
            self.model = PIXELS
        unknown = [p for p in self.protocol_list if p not in PROTOCOLS]
        if unknown or not self.protocol_list:
            raise ValueError(f"protocols must be a comma-separated subset of {PROTOCOLS}, got {self.protocols!r}")
        dense = [p for p in self.protocol_list if p in DENSE_PROTOCOLS]
        if dense and len(dense) != len(self.protocol_list):
            raise ValueError(
                f"protocols: {','.join(dense)} need masks or boxes; evaluate them apart from knn/linear/finetune"
            )
        if self.model == PIXELS and ("finetune" in self.protocol_list or dense):
            raise ValueError("raw pixels have nothing to fine-tune; use --protocols knn,linear")
        if self.model == PIXELS and self.random_init:
            raise ValueError("--random_init needs a model, not raw pixels")
        if self.baselines and (self.model == PIXELS or self.random_init):
            raise ValueError("--baselines compares a model with its baselines; --model pixels / --random_init are one")
        if self.baselines and not set(BASELINE_PROTOCOLS) & set(self.protocol_list):
            raise ValueError(f"--baselines scores {' and '.join(BASELINE_PROTOCOLS)}; --protocols has neither")
        if self.finetune_layout not in ("official", "as-is"):
            raise ValueError(f"finetune_layout must be 'official' or 'as-is', got {self.finetune_layout!r}")
        if self.linear_optimizer not in ("sgd", "adamw"):
            raise ValueError(f"linear_optimizer must be 'sgd' or 'adamw', got {self.linear_optimizer!r}")

    @property
    def protocol_list(self) -> list[str]:
        return [p.strip() for p in self.protocols.split(",") if p.strip()]

    @property
    def baseline(self) -> str | None:
        """What these arguments score in the model's place: `RAW_PIXELS`, `RANDOM_INIT`, or None (the model)."""
        return RAW_PIXELS if self.model == PIXELS else RANDOM_INIT if self.random_init else None

    def baseline_arguments(self) -> list[EvaluationArguments]:
        """With `--baselines`: the arguments of each baseline run (random init, raw pixels) on the same data,
        subsets and seed, restricted to the frozen-feature protocols requested."""
        if not self.baselines:
            return []
        protocols = ",".join(p for p in self.protocol_list if p in BASELINE_PROTOCOLS)
        common = dict(protocols=protocols, baselines=False, output=None, update_model_card=False)
        return [
            replace(self, random_init=True, **common),
            replace(self, model=PIXELS, raw_pixels=True, image_processor=None, **common),
        ]
