"""The pretraining job end to end: config -> model -> stream -> Trainer -> checkpoint, encoder, picture, card.

`run_pretraining` is the job as a list of named steps; `main` is `scripts/pretrain.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import set_seed

from simmim_hf import __version__
from simmim_hf.backbones import SUPPORTED_ENCODERS, check_attention_kernel, is_convnet
from simmim_hf.cli import parse_arguments
from simmim_hf.configuration_simmim import SimMIMConfig
from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.stats import apply_image_stats, data_provenance, resolve_image_stats
from simmim_hf.data.stream import DataArguments, StreamLoader, is_stream, load_pretrain_dataset
from simmim_hf.errors import RunFault, TrainingDiverged, UsageError
from simmim_hf.feature_pictures import attention_picture, has_cls_attention, pca_picture
from simmim_hf.masking import SimMIMMaskGenerator
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling, set_encoder_attention
from simmim_hf.pretrain import run_settings
from simmim_hf.pretrain.arguments import ModelArguments, SimMIMTrainingArguments, check_data_flags
from simmim_hf.pretrain.callbacks import ReconstructionCallback
from simmim_hf.pretrain.checkpoints import (
    TRAINER_STATE_FILE,
    check_resume_argument,
    checkpoint_step,
    find_resume_checkpoint,
    finished_run,
    io_fault_cause,
    load_weights_strictly,
)
from simmim_hf.pretrain.console import configure_logging, number_log_lines, run_header
from simmim_hf.pretrain.lock import decided_by_main_process, take_run_lock
from simmim_hf.pretrain.monitor import KNNMonitor, MonitorSet, monitor_curve, prepare_monitor_set
from simmim_hf.pretrain.trainer import SimMIMTrainer
from simmim_hf.publish.convert import export_encoder
from simmim_hf.publish.curves import images_at_step, save_curves
from simmim_hf.publish.hub import push_run_to_hub
from simmim_hf.publish.model_card import write_model_card
from simmim_hf.publish.run_dir import RunDir, staged_file, staged_folder, write_atomic
from simmim_hf.sectioned_parser import SectionedArgumentParser
from simmim_hf.visualization import save_reconstruction_grid

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """`scripts/pretrain.py`: parses the three argument dataclasses (`--config FILE` too) and pretrains."""
    parser = SectionedArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))
    model_args, data_args, training_args = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    configure_logging(training_args.should_log)  # transformers at warnings; the run header says what runs
    return run_pretraining(model_args, data_args, training_args)


def run_pretraining(
    model_args: ModelArguments, data_args: DataArguments, args: SimMIMTrainingArguments
) -> dict[str, Any]:
    """Pretrains, then leaves in `args.output_dir`: the SimMIM checkpoint, `encoder/` (stock transformers),
    `reconstruction.png`, `simmim_run.json` and the model card `README.md`. Returns the run summary."""
    with run_settings.no_new_folder_on_usage_error(args.output_dir):
        return _run_pretraining(model_args, data_args, args)


def _run_pretraining(
    model_args: ModelArguments, data_args: DataArguments, args: SimMIMTrainingArguments
) -> dict[str, Any]:
    check_launch(args)
    check_data_flags(data_args.streaming, args)
    decided_by_main_process(args, lambda: check_resume_argument(args.resume_from_checkpoint))
    done = finished_summary(args)
    if done is not None:
        return done
    lock = take_run_lock(args)  # one job per output_dir, before anything is written; released however the job ends
    try:
        set_seed(args.seed)
        config = build_config(model_args)
        image_stats = resolve_image_stats(model_args, data_args, config)
        config = apply_image_stats(config, image_stats, data_args, warn=args.should_log)
        stats_source = image_stats.source
        monitor_set = prepare_monitor_set(args, config, args.process_index, args.world_size)  # checked before data
        model = build_model(model_args, config)
        check_gradient_checkpointing(args, model)
        data = build_data(data_args, args, config)
        resume = resume_checkpoint(args, data)
        session = run_settings.settle(model_args, data_args, args, config, resume, checkpoint_step(resume or "") or 0)
        hub_push = take_over_hub_push(args)
        trainer = build_trainer(model, args, data)
        trainer.run_settings = session.record
        attach_monitor(trainer, monitor_set, config)
        if trainer.is_world_process_zero():
            run_settings.save_record(args.output_dir, session.record)
            header = run_header(model_args, data_args, args, config, model, data.dataset, stats_source, resume)
            logger.info("\n".join(filter(None, [header, run_settings.schedule_line(session, args)])))
        train(trainer, resume)
        summary = run_summary(model_args, data_args, args, config, trainer, stats_source)
        finish(trainer, data.preview, summary, hub_push)
        return summary
    finally:
        if lock is not None:
            lock.release()


# -- build ---------------------------------------------------------------------------------------------------------
def check_launch(args: SimMIMTrainingArguments) -> None:
    """A streaming run needs a positive `max_steps`. Several processes started by a launcher that each see a world
    size of 1 (e.g. `accelerate launch --multi_gpu` with no GPU visible) would each train alone on all the data and
    write the same folder: refuse."""
    if args.max_steps is None or args.max_steps <= 0:
        raise UsageError("max_steps: a streaming run needs a positive --max_steps")
    run_settings.check_numeric_flags(args)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > 1 and args.world_size != launched:
        raise UsageError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but this one sees a world size of "
            f"{args.world_size}, so each would train alone and write the same folder. No GPU is visible: launch on "
            f"CPUs with `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {launched} "
            "scripts/pretrain.py ...` (or add --use_cpu true); with GPUs, check CUDA_VISIBLE_DEVICES"
        )
    warmup = args.get_warmup_steps(args.max_steps)
    if warmup >= args.max_steps and args.should_log:
        logger.warning(
            "warmup_steps %d >= max_steps %d: the learning rate never reaches its peak %.3g (lower --warmup_steps)",
            warmup,
            args.max_steps,
            args.learning_rate,
        )


def finished_summary(args: SimMIMTrainingArguments) -> dict[str, Any] | None:
    """When no checkpoint is named (or `latest`) and `output_dir` holds a finished run of `max_steps` steps: its
    summary, after saying so once on stdout (rerunning a finished command does nothing). Else None."""
    if args.resume_from_checkpoint not in (None, "latest"):
        return None
    done = finished_run(args.output_dir, args.max_steps)
    if done is not None:
        print(  # once, on stdout (not also through the logger)
            f"{args.output_dir} holds a finished run of {args.max_steps} steps: nothing to do "
            "(raise --max_steps to continue it, or choose another --output_dir)"
        )
    return done


def build_config(model_args: ModelArguments) -> SimMIMConfig:
    """`SimMIMConfig.for_pretraining` from the arguments. Its validation errors (naming the field) are input mistakes,
    `UsageError`; so is a stock encoder that cannot be read or used, named by its `--init_encoder_from`."""
    try:
        overrides = model_args.overrides()
    except ValueError as error:
        raise UsageError(str(error)) from error
    stock_encoder = model_args.init_encoder_from if not model_args.model_name_or_path else None
    try:
        config = SimMIMConfig.for_pretraining(
            model_args.preset, model_args.model_name_or_path, model_args.init_encoder_from, **overrides
        )
    except (OSError, ValueError) as error:
        if stock_encoder:
            raise UsageError(f"--init_encoder_from {stock_encoder}: {error}") from error
        if isinstance(error, OSError):  # an unreadable --model_name_or_path: transformers' own message
            raise
        raise UsageError(str(error)) from error
    try:  # before any data is read; the family's kernels are what its stock class declares
        check_attention_kernel(config.encoder_config.model_type, model_args.attn_implementation)
    except ValueError as error:
        raise UsageError(f"--{error}") from None
    return config


def build_model(model_args: ModelArguments, config: SimMIMConfig) -> SimMIMForMaskedImageModeling:
    kwargs: dict[str, Any] = {}
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if model_args.model_name_or_path:
        return SimMIMForMaskedImageModeling.from_pretrained(model_args.model_name_or_path, config=config, **kwargs)
    if model_args.init_encoder_from:
        return SimMIMForMaskedImageModeling.from_encoder(model_args.init_encoder_from, config=config, **kwargs)
    set_encoder_attention(config.encoder_config, model_args.attn_implementation)  # checked by build_config
    return SimMIMForMaskedImageModeling(config)


def check_gradient_checkpointing(args: SimMIMTrainingArguments, model: torch.nn.Module) -> None:
    """`--activation_checkpointing` (or its old name `--gradient_checkpointing`) on an encoder whose transformers
    blocks cannot checkpoint (the ConvNets) is refused by name before any data is read, rather than failing inside
    the Trainer with a traceback."""
    asked = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing  # the old name mirrors it
    if not asked or any(hasattr(module, "gradient_checkpointing") for module in model.modules()):
        return
    encoder = model.config.encoder_type
    supported = ", ".join(name for name in SUPPORTED_ENCODERS if not is_convnet(name))
    raise UsageError(
        f"--activation_checkpointing (--gradient_checkpointing): transformers' {encoder} encoder "
        f"({type(model.simmim.encoder).__name__}) has no gradient checkpointing (it has for {supported} encoders); "
        "drop the flag, or save memory with a smaller --per_device_train_batch_size and more "
        "--gradient_accumulation_steps"
    )


@dataclass
class PretrainData:
    """The training data of this rank: the dataset, its collator, the stream loader (None for a map-style dataset)
    and the fixed batch of the reconstruction pictures."""

    dataset: Any
    collator: SimMIMCollator
    loader: StreamLoader | None
    preview: dict[str, torch.Tensor]


def build_data(data_args: DataArguments, args: SimMIMTrainingArguments, config: SimMIMConfig) -> PretrainData:
    dataset = load_pretrain_dataset(
        data_args,
        seed=args.seed,
        rank=args.process_index,
        world_size=args.world_size,
        num_workers=args.dataloader_num_workers,
        config=config,
        uint8=True,  # normalised on the device by SimMIMTrainer._prepare_inputs: 4x less to collate, pin and copy
    )
    collator = SimMIMCollator(SimMIMMaskGenerator.from_config(config), seed=args.seed, rank=args.process_index)
    loader = None
    if is_stream(dataset):
        loader = StreamLoader(
            dataset,
            collator,
            batch_size=args.per_device_train_batch_size,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and args.device.type == "cuda",
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        loader.expected_pass_images = run_settings.pass_length_hint(
            data_provenance(data_args)["num_source_images"], data_args.max_train_samples, args.world_size
        )
    # Preview images from a read with no shuffle buffer (a buffered stream would first fill it); shard order and
    # the random crop still depend on the seed.
    preview_source = load_pretrain_dataset(dataclasses.replace(data_args, shuffle_buffer_size=1), config=config)
    preview = visualization_batch(preview_source, config, args.num_visualize_images, args.seed)
    return PretrainData(dataset, collator, loader, preview)


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


# -- resume ------------------------------------------------------------------------------------------------------------
def resume_checkpoint(args: SimMIMTrainingArguments, data: PretrainData) -> str | None:
    """The checkpoint to continue from: the one given (verified at start), or (none given, or `latest`) the newest one
    in `output_dir` that verifies, chosen by the main process. A stream continues from its saved position, so the
    Trainer must not replay batches on top of it."""
    resume = args.resume_from_checkpoint
    if resume is None or resume == "latest":  # rerunning a command continues its run
        resume, passed_over = decided_by_main_process(args, lambda: find_resume_checkpoint(args.output_dir))
        for folder in passed_over:
            logger.warning("Not resuming from %s", folder)
        if resume:
            logger.info("Resuming from %s", resume)
    if data.loader is not None:
        args.ignore_data_skip = True
    return resume


def take_over_hub_push(args: SimMIMTrainingArguments) -> bool:
    """Whether to push at the end. The end-of-run push is ours (encoder + processor + card in one commit); the
    Trainer keeps pushing only when checkpoints were asked for (`--hub_strategy checkpoint|all_checkpoints`), for
    resuming elsewhere. An explicit `--hub_token` moves to HF_TOKEN (winning over one already set), out of the
    arguments saved with every checkpoint."""
    hub_push = args.push_to_hub
    if args.hub_token:
        os.environ["HF_TOKEN"] = args.hub_token
        args.hub_token = None
    strategy = str(args.hub_strategy).split(".")[-1].lower()
    if hub_push and strategy not in ("checkpoint", "all_checkpoints"):
        if strategy == "every_save":
            logger.info("--push_to_hub: publishing once at the end; --hub_strategy checkpoint also pushes checkpoints")
        args.push_to_hub = False
    return hub_push


# -- train ---------------------------------------------------------------------------------------------------------
def build_trainer(model: torch.nn.Module, args: SimMIMTrainingArguments, data: PretrainData) -> SimMIMTrainer:
    """The Trainer, with reconstruction pictures during training where a forward on one rank is safe."""
    reconstruction = ReconstructionCallback(
        data.preview["pixel_values"], data.preview["bool_masked_pos"], args.visualize_steps
    )
    trainer = SimMIMTrainer(
        model=model,
        args=args,
        train_dataset=data.dataset,
        data_collator=data.collator,
        callbacks=[reconstruction],
        stream_loader=data.loader,
    )
    number_log_lines(trainer)  # `step N: {'loss': ...}`
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not trainer.is_fsdp_enabled:
        # accelerate only shards on accelerators: on CPU processes (MULTI_CPU) it drops the FSDP plugin silently.
        logger.warning("An FSDP launch config was given but FSDP is off (accelerate has no FSDP on CPU): plain DDP")
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # A forward on one rank of a sharded model would hang the others: pictures only at the end, from the save.
        trainer.remove_callback(reconstruction)
    else:
        reconstruction.attach(trainer)
    return trainer


def attach_monitor(trainer: SimMIMTrainer, monitor_set: MonitorSet | None, config: SimMIMConfig) -> None:
    """Adds the kNN monitor (`pretrain.monitor`) and computes its baselines (collective: every rank). Under FSDP or
    DeepSpeed a forward of the bare encoder would bypass the sharding: the monitor is off there, with a warning."""
    trainer.knn_monitor = None
    if monitor_set is None:
        return
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        logger.warning("--monitor_dataset is ignored under FSDP/DeepSpeed: run scripts/evaluate.py on the result")
        return
    # No gradients in eval mode: the training batch fits, and small batches would leave the device idle.
    batch_size = max(trainer.args.per_device_eval_batch_size, trainer.args.per_device_train_batch_size)
    monitor = KNNMonitor(monitor_set, trainer.args.monitor_steps, batch_size)
    monitor.attach(trainer)
    monitor.compute_baselines(config, trainer.args.seed, trainer.args.device)
    trainer.add_callback(monitor)
    trainer.knn_monitor = monitor


def train(trainer: SimMIMTrainer, resume: str | None) -> None:
    """Trains to `max_steps` from `resume` (stream position and wall time restored), then refuses NaN/Inf weights."""
    trainer.restore_session(resume)
    if resume and (checkpoint_step(resume) or 0) >= trainer.args.max_steps:
        # Killed after its last checkpoint, before the end of the job: only the final save and export are left.
        load_weights_strictly(trainer.model, resume)
        trainer.state = trainer.state.load_from_json(str(Path(resume) / TRAINER_STATE_FILE))
    else:
        with trainer.preemption.installed():  # SIGTERM/SIGINT/SIGUSR1: stop after a step, with its checkpoint
            trainer.train(resume_from_checkpoint=resume)
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):  # sharded: checked by finish_run
        refuse_nonfinite(trainer.accelerator.unwrap_model(trainer.model))


# -- finish --------------------------------------------------------------------------------------------------------
def hardware_description(args: SimMIMTrainingArguments) -> str:
    if args.device.type == "cuda":
        return f"{args.world_size}x {torch.cuda.get_device_name(args.device)}"
    return f"{args.world_size}x CPU process ({os.cpu_count()} cores, {platform.machine()})"


def precision_of(args: SimMIMTrainingArguments) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


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
    trainer: SimMIMTrainer,
    stats_source: str,
) -> dict[str, Any]:
    """`simmim_run.json`: what the run did (steps, images, losses, faults, time, hardware, versions), the facts the
    model card shows, and every input in full: the three argument dataclasses (tokens removed) and the model config.
    Collective: every rank calls it."""
    loss_curve = [
        [entry["step"], finite_or_none(entry["loss"])] for entry in trainer.state.log_history if "loss" in entry
    ]
    faults, skipped = trainer.stream_totals()
    record = getattr(trainer, "run_settings", None)
    segments = run_settings.segments_summary(record, trainer.state.global_step, args.global_batch_size)
    arguments = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": {key: value for key, value in args.to_dict().items() if not key.endswith("_token")},
    }
    monitor = getattr(trainer, "knn_monitor", None)
    monitor_summary = None
    if monitor is not None:
        monitor_summary = {
            "dataset": args.monitor_dataset,
            "data_files": args.monitor_data_files,
            "train_samples": len(monitor.monitor.train_labels),
            "eval_samples": len(monitor.monitor.eval_labels),
            "every_n_steps": args.monitor_steps,
            "protocol": "weighted kNN (k=20, T=0.07, cosine), mean-pooled patch features, top-1",
            "baselines": monitor.baselines,
        }

    def images_at(step: int) -> int:
        return images_at_step(step, segments, args.global_batch_size)

    curve = monitor_curve(trainer.state.log_history, images_at)
    if monitor_summary is not None:
        monitor_summary["final_knn_top1"] = curve[-1][2] if curve else None
    summary = {
        # What the model card shows.
        "preset": config.preset,
        "backbone": config.encoder_type,
        "image_size": config.image_size,
        "num_channels": config.num_channels,
        "mask_patch_size": config.mask_patch_size,
        "mask_ratio": config.mask_ratio,
        "conv_masking": config.conv_masking,
        "decoder_type": config.decoder_type,
        "loss_type": config.loss_type,
        "norm_target": config.norm_target,
        "image_mean": config.image_mean,
        "image_std": config.image_std,
        "image_stats_source": stats_source,
        "max_steps": args.max_steps,
        "per_device_batch_size": args.per_device_train_batch_size,
        "num_processes": args.world_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch_size": args.global_batch_size,
        "base_learning_rate": args.base_learning_rate,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": run_settings.schedule_name(args),
        "warmup_steps": args.get_warmup_steps(args.max_steps),
        "weight_decay": args.weight_decay,
        "precision": precision_of(args),
        "seed": args.seed,
        "dataset_name": data_args.dataset_name,
        "dataset_config_name": data_args.dataset_config_name,
        "base_model": model_args.model_name_or_path or model_args.init_encoder_from,
        **data_provenance(data_args),
        # What happened.
        "steps_completed": trainer.state.global_step,
        "images_seen": sum(segment["images"] for segment in segments),
        "settings_segments": segments,
        "final_loss": loss_curve[-1][1] if loss_curve else None,
        "loss_curve": loss_curve,
        "monitor": monitor_summary,
        "monitor_curve": curve,
        "nonfinite_steps": trainer.nonfinite_steps,
        "data_faults": faults,
        "images_skipped_at_resume": skipped,
        "hardware": hardware_description(args),
        "wall_time_seconds": round(trainer.wall_time(), 1),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "simmim_hf_version": __version__,
        # Every input, in full.
        "arguments": arguments,
        "config": config.to_dict(),
    }
    return json.loads(json.dumps(summary, default=str))  # plain JSON values (enums, paths) as written


def finish(trainer: SimMIMTrainer, preview: dict[str, torch.Tensor], summary: dict[str, Any], push: bool) -> None:
    """Saves the model (every rank takes part: FSDP/DeepSpeed gather the weights), then the main process exports
    the encoder, picture, summary and card (`finish_run`); a failure there is raised on it after the barrier."""
    save_full_model(trainer, trainer.args.output_dir)
    failure: BaseException | None = None
    if trainer.is_world_process_zero():
        try:
            finish_run(trainer.args, preview, summary, push=push)
        except BaseException as error:  # reach the barrier first, so the other ranks are not left waiting
            failure = error
    trainer.accelerator.wait_for_everyone()
    if failure is not None:
        raise finish_fault(failure, Path(trainer.args.output_dir))


def finish_fault(error: BaseException, output_dir: Path) -> BaseException:
    """A write of the finish that failed for lack of space or another I/O error becomes one line (`RunFault`, exit
    1): what failed, and that a rerun completes what is missing (`finished_run`); anything else is raised as it is."""
    cause = io_fault_cause(error, output_dir)
    if cause is None:
        return error
    fault = RunFault(
        f"cannot finish the run in {output_dir}: {cause}. The training is complete and its final checkpoint "
        "intact; free some space, then rerun the same command: it writes what is missing without training"
    )
    fault.__cause__ = error
    return fault


def save_full_model(trainer: SimMIMTrainer, output_dir: str) -> None:
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
    # Each piece replaces its file (folder) atomically; the card comes last (it renders the summary), and a finished
    # run needs all of them (`checkpoints.finished_run`), so a rerun after a kill here writes them again.
    with staged_folder(run.encoder) as staging:
        export_encoder(model, staging)
    with staged_file(run.reconstruction) as staging:
        save_reconstruction_grid(model, preview["pixel_values"], preview["bool_masked_pos"], staging)
    mean, std = model.config.image_mean, model.config.image_std
    with staged_file(run.pca_picture) as staging:
        pca_picture(model, preview["pixel_values"], mean, std).save(staging, format="PNG")
    if has_cls_attention(model):
        with staged_file(run.attention_picture) as staging:
            attention_picture(model, preview["pixel_values"], mean, std).save(staging, format="PNG")
    with staged_file(run.curves) as staging:
        save_curves(summary, staging)
    write_atomic(run.summary, json.dumps(summary, indent=2) + "\n")
    write_model_card(output_dir)
    logger.info(
        "Wrote %s (checkpoint, encoder/, reconstruction, feature pictures, curves.png, model card)", output_dir
    )
    if push:
        repo_id = args.hub_model_id or output_dir.name
        url = push_run_to_hub(
            output_dir, repo_id, private=bool(args.hub_private_repo), revision=args.hub_revision, token=None
        )
        logger.info("Pushed to %s", url)
