"""The pretraining job end to end: config -> model -> stream -> Trainer -> checkpoint, encoder, picture, card.

`scripts/pretrain.py` parses the three argument dataclasses and calls `run_pretraining`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers import set_seed

from simmim_hf import __version__
from simmim_hf.configuration_simmim import SimMIMConfig
from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.faults import FAULT_REASONS, add_counts
from simmim_hf.data.images import normalize_pixel_values
from simmim_hf.data.stats import data_provenance, resolve_image_stats
from simmim_hf.data.stream import DataArguments, StreamLoader, load_pretrain_dataset
from simmim_hf.errors import TrainingDiverged, UsageError
from simmim_hf.masking import SimMIMMaskGenerator
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.pretrain.callbacks import ReconstructionCallback
from simmim_hf.pretrain.checkpoints import checkpoint_step, find_resume_checkpoint, finished_run, load_weights_strictly
from simmim_hf.pretrain.console import run_header
from simmim_hf.pretrain.trainer import ModelArguments, SimMIMTrainingArguments, ThroughputTrainer
from simmim_hf.publish.convert import export_encoder
from simmim_hf.publish.run_dir import RunDir
from simmim_hf.visualization import save_reconstruction_grid

logger = logging.getLogger(__name__)


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`"hidden_size=256,depths=[2,2,6,2],drop_path_rate=0.1"` -> dict; values are JSON when they parse as JSON.
    Commas inside brackets belong to the value."""
    overrides: dict[str, Any] = {}
    for item in re.split(r",(?![^\[\]]*\])", text or ""):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config_overrides: expected key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_config(model_args: ModelArguments) -> SimMIMConfig:
    """The preset with overrides, or a checkpoint's config with the same overrides, validated either way."""
    overrides = {
        key: getattr(model_args, key)
        for key in ("mask_ratio", "mask_patch_size", "image_size")
        if getattr(model_args, key) is not None
    }
    overrides.update(parse_overrides(model_args.config_overrides))
    if model_args.init_encoder_from and model_args.model_name_or_path:
        raise UsageError(
            "--init_encoder_from and --model_name_or_path: give one (a stock encoder to start from, or a SimMIM "
            "checkpoint to continue)"
        )
    if model_args.init_encoder_from:
        try:
            return SimMIMConfig.from_encoder(model_args.init_encoder_from, **overrides)
        except (OSError, ValueError) as error:
            raise UsageError(f"--init_encoder_from {model_args.init_encoder_from}: {error}") from error
    if not model_args.model_name_or_path:
        return SimMIMConfig.from_preset(model_args.preset, **overrides)
    base = SimMIMConfig.from_pretrained(model_args.model_name_or_path)
    if "num_channels" in overrides and "image_mean" not in overrides:
        raise ValueError("num_channels: changing the channel count of a checkpoint needs image_mean and image_std")
    return base.with_overrides(**overrides)  # re-validated, derived encoder fields rebuilt


def build_model(model_args: ModelArguments, config: SimMIMConfig) -> SimMIMForMaskedImageModeling:
    kwargs: dict[str, Any] = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path:
        return SimMIMForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, config=config, **kwargs)
    if model_args.init_encoder_from:
        return SimMIMForMaskedImageModeling.from_encoder(model_args.init_encoder_from, config=config, **kwargs)
    if kwargs:
        config.encoder_config._attn_implementation = kwargs["attn_implementation"]
    return SimMIMForMaskedImageModeling(config)


class StreamTrainer(ThroughputTrainer):
    """Feeds the Trainer from a `StreamLoader` (each rank reads only its own shards; no accelerate re-split, no
    rank-0 dispatch) and keeps the stream position in every checkpoint, so resume continues the stream instead of
    replaying it."""

    def __init__(self, *args: Any, stream_loader: StreamLoader | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_loader = stream_loader
        # Training time of earlier sessions of this run (restored on resume), so the card's wall time is the total.
        self.earlier_wall_time = 0.0
        self.session_start = time.perf_counter()

    def wall_time(self) -> float:
        return self.earlier_wall_time + time.perf_counter() - self.session_start

    def stream_totals(self) -> tuple[dict[str, int], int]:
        """(data faults per reason, images skipped at resumes) for the whole run, summed over ranks (collective)."""
        faults = self.stream_loader.fault_counts() if self.stream_loader is not None else add_counts()
        skipped = self.stream_loader.skipped_at_resume if self.stream_loader is not None else 0
        if self.args.world_size > 1:
            values = torch.tensor([*(faults[r] for r in FAULT_REASONS), skipped], device=self.args.device)
            values = self.accelerator.reduce(values, reduction="sum").tolist()
            faults, skipped = dict(zip(FAULT_REASONS, map(int, values))), int(values[-1])
        return faults, skipped

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Training log lines are written on every rank at the same step, so the all-reduce is safe there.
        if self.stream_loader is not None and "loss" in logs:
            faults, _ = self.stream_totals()
            if any(faults.values()):
                logs.update({f"data_faults/{reason}": count for reason, count in faults.items()})
        super().log(logs, start_time)

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Moves the batch to the device, where uint8 `pixel_values` (the job's collated images) are normalised
        with the model config's `image_mean`/`image_std`; float pixel values pass unchanged."""
        inputs = super()._prepare_inputs(inputs)
        pixel_values = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixel_values is not None and pixel_values.dtype == torch.uint8:
            config = self.accelerator.unwrap_model(self.model).config
            inputs["pixel_values"] = normalize_pixel_values(pixel_values, config.image_mean, config.image_std)
        return inputs

    def get_train_dataloader(self):
        if self.stream_loader is None:
            return super().get_train_dataloader()
        return self.stream_loader

    def write_checkpoint_extras(self, folder: Path) -> None:
        # Inside the staging folder, before the Trainer's files: the checkpoint is renamed complete with them.
        if self.stream_loader is not None:
            path = RunDir.stream_state_file(folder, self.args.process_index)
            path.write_text(json.dumps(self.stream_loader.state_dict()))
        if self.is_world_process_zero():
            RunDir.wall_time_file(folder).write_text(json.dumps({"wall_time_seconds": self.wall_time()}))


def restore_stream_position(loader: StreamLoader, checkpoint: str, rank: int) -> bool:
    path = RunDir.stream_state_file(checkpoint, rank)
    if not path.is_file():
        logger.warning("No stream position in %s; the stream restarts from a fresh shuffle", checkpoint)
        return False
    loader.load_state_dict(json.loads(path.read_text()))
    return True


def visualization_batch(dataset: Any, config: SimMIMConfig, count: int, seed: int) -> dict[str, torch.Tensor]:
    """The first `count` decodable images of the stream with a fixed mask, for the reconstruction pictures."""
    images = []
    for example in dataset:
        if example.get("pixel_values") is not None:
            images.append(example["pixel_values"])
        if len(images) == count:
            break
    if not images:
        raise ValueError("The training data yielded no decodable image")
    mask = SimMIMMaskGenerator.from_config(config)(len(images), generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": torch.stack(images), "bool_masked_pos": mask}


def hardware_description(args: SimMIMTrainingArguments) -> str:
    if args.device.type == "cuda":
        return f"{args.world_size}x {torch.cuda.get_device_name(args.device)}"
    return f"{args.world_size}x CPU process ({os.cpu_count()} cores, {platform.machine()})"


def precision_of(args: SimMIMTrainingArguments) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


def check_launch(args: SimMIMTrainingArguments) -> None:
    """Several processes started by a launcher that each see a world size of 1 (e.g. `accelerate launch --multi_gpu`
    with no GPU visible) would each train alone on all the data and write the same folder: refuse."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size != launched:
        raise UsageError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one sees a world size of "
            f"{args.world_size}, so each would train alone and write the same folder. No GPU is visible: launch on "
            f"CPUs with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} "
            "scripts/pretrain.py ...` (or add --use_cpu true); with GPUs, check CUDA_VISIBLE_DEVICES"
        )


def finite_or_none(value: Any) -> Any:
    """NaN/Inf -> None (JSON null, "n/a" in the card): a non-finite loss is never shown as a number."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def refuse_nonfinite(model: torch.nn.Module) -> None:
    """A model with NaN/Inf weights is never saved as the result, exported, carded or pushed."""
    broken = [name for name, param in model.named_parameters() if not torch.isfinite(param.detach()).all()]
    if broken:
        raise TrainingDiverged(f"{len(broken)} weight tensors hold NaN/Inf (e.g. {broken[0]}): nothing exported")


def run_summary(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: SimMIMTrainingArguments,
    config: SimMIMConfig,
    trainer: ThroughputTrainer,
    wall_time: float,
) -> dict[str, Any]:
    loss_curve = [
        [entry["step"], finite_or_none(entry["loss"])] for entry in trainer.state.log_history if "loss" in entry
    ]
    faults, skipped = trainer.stream_totals() if isinstance(trainer, StreamTrainer) else (add_counts(), 0)
    return {
        "preset": config.preset,
        "backbone": config.encoder_type,
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "mask_patch_size": config.mask_patch_size,
        "mask_ratio": config.mask_ratio,
        "max_steps": args.max_steps,
        "steps_completed": trainer.state.global_step,
        "per_device_batch_size": args.per_device_train_batch_size,
        "num_processes": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": args.global_batch_size,
        "images_seen": trainer.state.global_step * args.global_batch_size,
        "base_learning_rate": args.base_learning_rate,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "multistep" if args.lr_milestones else str(args.lr_scheduler_type).split(".")[-1].lower(),
        "warmup_steps": args.get_warmup_steps(args.max_steps),
        "weight_decay": args.weight_decay,
        "precision": precision_of(args),
        "hardware": hardware_description(args),
        "wall_time_seconds": round(wall_time, 1),
        "dataset_name": data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "base_model": model_args.model_name_or_path or model_args.init_encoder_from,
        "final_loss": loss_curve[-1][1] if loss_curve else None,
        "loss_curve": loss_curve,
        "nonfinite_steps": getattr(trainer, "nonfinite_steps", 0),
        "data_faults": faults,
        "images_skipped_at_resume": skipped,
        "seed": args.seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "simmim_hf_version": __version__,
    }


def run_pretraining(
    model_args: ModelArguments, data_args: DataArguments, args: SimMIMTrainingArguments
) -> dict[str, Any]:
    """Pretrains, then leaves in `args.output_dir`: the SimMIM checkpoint, `encoder/` (stock transformers),
    `reconstruction.png`, `simmim_run.json` and the model card `README.md`. Returns the run summary."""
    if args.max_steps is None or args.max_steps <= 0:
        raise UsageError("max_steps: a streaming run needs a positive --max_steps")
    check_launch(args)
    resume = args.resume_from_checkpoint
    auto_resume = resume is None or resume == "latest"  # rerunning a command continues its run
    if auto_resume:
        done = finished_run(args.output_dir, args.max_steps)
        if done is not None:
            message = (
                f"{args.output_dir} holds a finished run of {args.max_steps} steps: nothing to do "
                "(raise --max_steps to continue it, or choose another --output_dir)"
            )
            print(message)  # once, on stdout (not also through the logger)
            return done
    set_seed(args.seed)
    try:
        config = build_config(model_args)
    except UsageError:
        raise
    except ValueError as error:  # SimMIMConfig's validation names the field: an input mistake, exit 2
        raise UsageError(str(error)) from error
    stats_source = resolve_image_stats(model_args, data_args, config, warn=args.should_log)
    model = build_model(model_args, config)

    dataset = load_pretrain_dataset(
        data_args,
        seed=args.seed,
        rank=args.process_index,
        world_size=args.world_size,
        num_workers=args.dataloader_num_workers,
        config=config,
        uint8=True,  # normalised on the device by StreamTrainer._prepare_inputs: 4x less to collate, pin and copy
    )
    collator = SimMIMCollator(SimMIMMaskGenerator.from_config(config), seed=args.seed, rank=args.process_index)
    loader = None
    if isinstance(dataset, datasets.IterableDataset):
        loader = StreamLoader(
            dataset,
            collator,
            batch_size=args.per_device_train_batch_size,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
            prefetch_factor=args.dataloader_prefetch_factor,
        )
    # Preview images from a read with no shuffle buffer (a buffered stream would first fill it); shard order and
    # the random crop still depend on the seed.
    preview_source = load_pretrain_dataset(dataclasses.replace(data_args, shuffle_buffer_size=1), config=config)
    preview = visualization_batch(preview_source, config, args.num_visualize_images, args.seed)

    if auto_resume:
        resume, passed_over = find_resume_checkpoint(args.output_dir)
        for folder in passed_over:
            logger.warning("Not resuming from incomplete %s", folder)
        if resume:
            logger.info("Resuming from %s", resume)
    if resume and loader is not None:
        restore_stream_position(loader, resume, args.process_index)
    if loader is not None:
        # Resume continues the stream from the saved position; the Trainer must not replay batches on top of it.
        args.ignore_data_skip = True

    # The end-of-run push is ours (encoder + processor + card in one commit). The Trainer keeps pushing only when
    # checkpoints were asked for (`--hub_strategy checkpoint|all_checkpoints`), for resuming elsewhere.
    hub_push = args.push_to_hub
    if args.hub_token:
        # Keep the token out of training_args.bin (pickled into every checkpoint, which may be pushed): hand it to
        # huggingface_hub through the environment of this process instead.
        # An explicit --hub_token wins over an HF_TOKEN already set.
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None
    strategy = str(args.hub_strategy).split(".")[-1].lower()
    if hub_push and strategy not in ("checkpoint", "all_checkpoints"):
        if strategy == "every_save":
            logger.info("--push_to_hub: publishing once at the end; --hub_strategy checkpoint also pushes checkpoints")
        args.push_to_hub = False

    reconstruction = ReconstructionCallback(preview["pixel_values"], preview["bool_masked_pos"], args.visualize_steps)
    trainer = StreamTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[reconstruction],
        stream_loader=loader,
    )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate only shards on accelerators: on CPU processes (MULTI_CPU) it drops the FSDP plugin silently.
        logger.warning("An FSDP launch config was given but FSDP is off (accelerate has no FSDP on CPU): plain DDP")
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # A forward on one rank of a sharded model would hang the others: pictures only at the end, from the save.
        trainer.remove_callback(reconstruction)
    else:
        reconstruction.attach(trainer)
    if trainer.is_world_process_zero():
        logger.info(run_header(model_args, data_args, args, config, model, dataset, stats_source, resume))
    if resume and RunDir.wall_time_file(resume).is_file():
        trainer.earlier_wall_time = json.loads(RunDir.wall_time_file(resume).read_text())["wall_time_seconds"]
    trainer.session_start = time.perf_counter()
    if resume and (checkpoint_step(resume) or 0) >= args.max_steps:
        # Killed after its last checkpoint, before the end of the job: only the final save and export are left.
        load_weights_strictly(model, resume)
        trainer.state = trainer.state.load_from_json(str(Path(resume) / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=resume)
    wall_time = trainer.wall_time()
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):  # sharded: checked by finish_run
        refuse_nonfinite(trainer.accelerator.unwrap_model(trainer.model))

    summary = run_summary(model_args, data_args, args, config, trainer, wall_time)
    summary.update(image_mean=config.image_mean, image_std=config.image_std, image_stats_source=stats_source)
    summary.update(data_provenance(data_args))
    # Every rank takes part in saving (FSDP/DeepSpeed gather the weights); the rest is the main process's.
    save_full_model(trainer, args.output_dir)
    failure: BaseException | None = None
    if trainer.is_world_process_zero():
        try:
            finish_run(args, preview, summary, push=hub_push)
        except BaseException as error:  # reach the barrier first, so the other ranks are not left waiting
            failure = error
    trainer.accelerator.wait_for_everyone()
    if failure is not None:
        raise failure
    return summary


def save_full_model(trainer: StreamTrainer, output_dir: str) -> None:
    """`Trainer.save_model`, with FSDP's sharded state dict switched to a full one (gathered on the main process) for
    this last save, so that the job's export, picture and card can `from_pretrained` it; checkpoints stay sharded."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    if plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
        plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(output_dir)


def finish_run(
    args: SimMIMTrainingArguments, preview: dict[str, torch.Tensor], summary: dict[str, Any], push: bool
) -> None:
    """Main process, after `Trainer.save_model`: stock encoder, picture, summary, card, optional Hub push. Works from
    the saved checkpoint, so it is the same under DDP, FSDP and DeepSpeed."""
    output_dir = Path(args.output_dir)
    run = RunDir(output_dir)
    model = SimMIMForMaskedImageModeling.from_pretrained(output_dir).eval()
    refuse_nonfinite(model)
    export_encoder(model, run.encoder)
    save_reconstruction_grid(model, preview["pixel_values"], preview["bool_masked_pos"], run.reconstruction)
    run.summary.write_text(json.dumps(summary, indent=2) + "\n")
    from simmim_hf.publish.hub import push_run_to_hub
    from simmim_hf.publish.model_card import write_model_card

    write_model_card(output_dir)
    logger.info("Wrote %s (checkpoint, encoder/, reconstruction.png, model card)", output_dir)
    if push:
        repo_id = args.hub_model_id or output_dir.name
        url = push_run_to_hub(
            output_dir, repo_id, private=bool(args.hub_private_repo), revision=args.hub_revision, token=None
        )
        logger.info("Pushed to %s", url)
