"""The run folder: every name a pretraining run leaves in its `output_dir`, in one dataclass.

    runs/demo/                      RunDir("runs/demo")
      config.json, model.safetensors  .full_config, the full SimMIM checkpoint (`from_pretrained(run.path)`)
      simmim_run.json                 .summary, the run summary (`read_summary()`)
      encoder/                        .encoder, the stock transformers encoder + image processor (`export_encoder`)
      reconstruction.png              .reconstruction, original / masked / reconstruction rows
      features_pca.png                .pca_picture, PCA of the last feature map of the preview images
      features_attention.png          .attention_picture, CLS-to-patch attention per head (ViT/DeiT/BEiT)
      curves.png                      .curves, loss and monitor kNN against images seen (`publish.curves`)
      README.md                       .card, the model card
      eval_results.json               .eval_results, every evaluation of this run (`merge_eval_results`)
      simmim_settings.json            .settings, the settings that define the run and its segments
                                      (`pretrain.run_settings`)
      checkpoint-N/                   Trainer checkpoints, each with `stream_state_file(checkpoint, rank)`,
                                      `wall_time_file(checkpoint)` and `settings_file(checkpoint)` beside the
                                      Trainer's own files, and `manifest_file(checkpoint)` (every file's size
                                      and SHA-256), written last
      .simmim_job.lock                .lock, held by the job running in the folder (host, PID, start time)

Every file of the run folder is replaced atomically (`write_atomic`: a temporary file, then `os.replace`; `encoder/`
through `staged_folder`), so a kill or a full disk leaves the old file or none, never a cut one.

Pretraining writes these files, the model card, the Hub push, evaluation and the scripts read them, all through
`RunDir`: renaming one here renames it everywhere. Reads JSON only (no torch/transformers import), so that the push
script and the card work on a machine without the training stack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from simmim_hf.errors import NotARunDirError

logger = logging.getLogger(__name__)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a JSON object from `path`, with the file name in the error when it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; when the block ends without an error, the file is synced
    and renamed onto `path` (`os.replace`), so readers see the old file or the complete new one, never a partial one.
    On any error (a full disk, an interrupt) the temporary file is removed and the old file stays."""
    path = Path(path)
    staging = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # the suffix kept: PIL reads it
    for leftover in path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"):  # of a write that was killed
        leftover.unlink(missing_ok=True)
    try:
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Writes `data` (text as UTF-8) to `path` through `staged_file`."""
    with staged_file(path) as staging:
        staging.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside `path`; when the block ends without an error, the staging folder
    replaces `path` (a folder) in two renames, so `path` is always absent, the old folder or the complete new one.
    On an error the staging folder is removed and `path` is left as it was."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    for leftover in path.parent.glob(f".{path.name}.[to][ml][pd]-*"):  # .tmp-* / .old-* of a write that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        if path.exists():
            os.replace(path, old)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def has_safetensors_weights(folder: Path) -> bool:
    """Whether `folder` holds safetensors weights (one file or a sharded index)."""
    return any((folder / name).is_file() for name in _WEIGHT_FILES)


@dataclass(frozen=True)
class RunDir:
    """The output folder of one pretraining run (see the module docstring for its layout)."""

    path: Path

    SUMMARY_NAME: ClassVar[str] = "simmim_run.json"
    ENCODER_NAME: ClassVar[str] = "encoder"
    RECONSTRUCTION_NAME: ClassVar[str] = "reconstruction.png"
    PCA_NAME: ClassVar[str] = "features_pca.png"
    ATTENTION_NAME: ClassVar[str] = "features_attention.png"
    CURVES_NAME: ClassVar[str] = "curves.png"
    CARD_NAME: ClassVar[str] = "README.md"
    EVAL_RESULTS_NAME: ClassVar[str] = "eval_results.json"
    SETTINGS_NAME: ClassVar[str] = "simmim_settings.json"
    FULL_CONFIG_NAME: ClassVar[str] = "config.json"
    # What a stock `AutoModel`/`AutoImageProcessor.from_pretrained(run.encoder)` needs besides the weights.
    ENCODER_REQUIRED_FILES: ClassVar[tuple[str, ...]] = ("config.json", "preprocessor_config.json")
    # On the Hub the encoder files sit at the repository root and the full SimMIM checkpoint under this folder.
    HUB_FULL_CHECKPOINT_DIR: ClassVar[str] = "simmim"
    # Written by the job into each checkpoint-N folder, next to the Trainer's files.
    STREAM_STATE_NAME: ClassVar[str] = "stream_state_rank{rank}.json"
    WALL_TIME_NAME: ClassVar[str] = "simmim_wall_time.json"
    # Written last into each checkpoint-N folder: size and SHA-256 of every file (`pretrain.manifest`).
    MANIFEST_NAME: ClassVar[str] = "simmim_manifest.json"
    # Held in the run folder while a job runs in it (`pretrain.lock`).
    LOCK_NAME: ClassVar[str] = ".simmim_job.lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # a str or os.PathLike is welcome too

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY_NAME

    @property
    def encoder(self) -> Path:
        return self.path / self.ENCODER_NAME

    @property
    def reconstruction(self) -> Path:
        return self.path / self.RECONSTRUCTION_NAME

    @property
    def pca_picture(self) -> Path:
        return self.path / self.PCA_NAME

    @property
    def attention_picture(self) -> Path:
        return self.path / self.ATTENTION_NAME

    @property
    def curves(self) -> Path:
        return self.path / self.CURVES_NAME

    @property
    def card(self) -> Path:
        return self.path / self.CARD_NAME

    @property
    def eval_results(self) -> Path:
        return self.path / self.EVAL_RESULTS_NAME

    @property
    def settings(self) -> Path:
        return self.path / self.SETTINGS_NAME

    @property
    def full_config(self) -> Path:
        return self.path / self.FULL_CONFIG_NAME

    @classmethod
    def stream_state_file(cls, checkpoint: str | os.PathLike, rank: int) -> Path:
        """Where rank `rank` saves its position in the data stream inside a checkpoint folder."""
        return Path(checkpoint) / cls.STREAM_STATE_NAME.format(rank=rank)

    @classmethod
    def wall_time_file(cls, checkpoint: str | os.PathLike) -> Path:
        """Where the training wall time so far is saved inside a checkpoint folder."""
        return Path(checkpoint) / cls.WALL_TIME_NAME

    @classmethod
    def settings_file(cls, checkpoint: str | os.PathLike) -> Path:
        """Where the run's settings record (as of that checkpoint) is saved inside a checkpoint folder."""
        return Path(checkpoint) / cls.SETTINGS_NAME

    @classmethod
    def manifest_file(cls, checkpoint: str | os.PathLike) -> Path:
        """The manifest of a checkpoint folder: every file's size and SHA-256, written last."""
        return Path(checkpoint) / cls.MANIFEST_NAME

    @property
    def lock(self) -> Path:
        """The lock file of the job running in this folder (host, PID, start time)."""
        return self.path / self.LOCK_NAME

    @classmethod
    def containing(cls, model: str | os.PathLike) -> RunDir | None:
        """The pretraining run behind `model` (the run folder itself or its `encoder/`), or None when it is neither."""
        folder = Path(model)
        for candidate in (cls(folder), cls(folder.parent)):
            if candidate.summary.is_file() and candidate.encoder.is_dir():
                return candidate
        return None

    def read_summary(self) -> dict[str, Any]:
        """The run summary (`simmim_run.json`) as a dict."""
        return read_json(self.summary)

    def finish_missing(self) -> list[str]:
        """What the end of a pretraining run leaves that is absent or unreadable here (empty: the run's outputs are
        complete): the final weights, `encoder/` (weights, config, processor), the picture, a readable summary and a
        non-empty card."""
        missing = [] if has_safetensors_weights(self.path) else ["model.safetensors"]
        encoder_files = [self.encoder / name for name in self.ENCODER_REQUIRED_FILES]
        if not (has_safetensors_weights(self.encoder) and all(path.is_file() for path in encoder_files)):
            missing.append(f"{self.ENCODER_NAME}/")
        for path in (self.reconstruction, self.card):
            if not (path.is_file() and path.stat().st_size > 0):
                missing.append(path.name)
        try:
            self.read_summary()
        except (OSError, ValueError):
            missing.append(self.SUMMARY_NAME)
        return missing

    def read_eval_results(self) -> dict[str, Any] | None:
        """The run's stored evaluation results (`eval_results.json`), or None before its first evaluation."""
        return read_json(self.eval_results) if self.eval_results.is_file() else None

    def merge_eval_results(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Adds an evaluation (the JSON of scripts/evaluate.py) to the run's stored results and returns them all.

        A result row replaces an earlier one with the same protocol, metric, dataset, split, train_samples,
        baseline and feature layer; the others are kept, so evaluating kNN today and fine-tuning tomorrow leaves both
        in the card, and a baseline's rows never replace the model's. The file is replaced atomically."""

        def key(row: dict[str, Any]) -> tuple:
            names = ("protocol", "metric", "dataset", "split", "train_samples", "baseline", "feature_layer")
            return tuple(row.get(name) for name in names)

        new_rows = list(payload.get("results") or [])
        new_keys = {key(row) for row in new_rows}
        earlier = self.read_eval_results() or {}
        kept = [row for row in earlier.get("results") or [] if key(row) not in new_keys]
        merged = {**payload, "results": kept + new_rows}
        write_atomic(self.eval_results, json.dumps(merged, indent=2) + "\n")
        return merged

    def read_encoder_config(self) -> dict[str, Any]:
        """The exported encoder's `config.json` as a dict."""
        return read_json(self.encoder / "config.json")


def validate_run_dir(run_dir: str | os.PathLike, include_full_checkpoint: bool = False) -> Path:
    """Checks that `run_dir` is a pretraining output that can be published; returns it as a `Path`.

    Needs `simmim_run.json` and `encoder/` (config.json, safetensors weights, preprocessor_config.json), plus the
    full checkpoint (config.json with model_type "simmim" and safetensors weights) when `include_full_checkpoint`.
    Raises `NotARunDirError` naming every missing piece.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise NotARunDirError(f"{run.path} is not a folder; pass the output_dir of scripts/pretrain.py")
    encoder = run.ENCODER_NAME
    missing = [] if run.summary.is_file() else [run.SUMMARY_NAME]
    missing += [f"{encoder}/{name}" for name in run.ENCODER_REQUIRED_FILES if not (run.encoder / name).is_file()]
    if not has_safetensors_weights(run.encoder):
        missing.append(f"{encoder}/model.safetensors")
    if include_full_checkpoint:
        missing += [] if run.full_config.is_file() else [run.FULL_CONFIG_NAME]
        missing += [] if has_safetensors_weights(run.path) else ["model.safetensors"]
    if missing:
        raise NotARunDirError(
            f"{run.path} is not a SimMIM pretraining output: missing {', '.join(missing)}. Pass the output_dir "
            f"of scripts/pretrain.py (it writes {run.SUMMARY_NAME} and, through simmim_hf.export_encoder, "
            f"{encoder}/)."
        )
    try:
        run.read_summary()
        encoder_config = run.read_encoder_config()
        processor_config = read_json(run.encoder / "preprocessor_config.json")
        full_config = read_json(run.full_config) if include_full_checkpoint else {}
    except ValueError as error:
        raise NotARunDirError(f"{run.path} is not a usable pretraining output: {error}") from error
    if include_full_checkpoint and full_config.get("model_type") != "simmim":
        raise NotARunDirError(
            f"{run.full_config} has model_type {full_config.get('model_type')!r}, not 'simmim'; it is not a "
            "full SimMIM checkpoint, so --include_full_checkpoint cannot publish it."
        )
    if encoder_config.get("num_channels", 3) == 3 and not processor_config.get("do_convert_rgb"):
        # Stock processors then reject greyscale/RGBA images instead of converting them; still loadable: a warning.
        logger.warning("%s/preprocessor_config.json lacks do_convert_rgb=true: greyscale inputs will fail", encoder)
    return run.path
