"""What a pretraining run prints: our log format, transformers kept at warnings, and a concise run header.

transformers logs at INFO every config it loads or saves (an 80-line JSON per `from_pretrained`), the Trainer's
"Running training" block (with `Num Epochs = 9,223,372,036,854,775,807` for a `max_steps`-driven stream) and a
progress bar per weight file written or read. `configure_logging` keeps transformers at WARNING (its progress bars
off, the Hub's kept), drops that epoch line even if a user turns INFO back on, and `run_header` says instead, once,
what the run is. `number_log_lines` makes every training log line say its optimizer step (`step 20: {'loss': ...}`).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import PrinterCallback, ProgressCallback

from simmim_hf.pretrain.arguments import learning_rate_rule
from simmim_hf.pretrain.run_settings import schedule_name

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class DropTrainerEpochLine(logging.Filter):
    """Drops the Trainer's `Num Epochs = ...` line: with `max_steps` over an endless stream it reads 9.2e18."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Num Epochs =" not in record.getMessage()


_EPOCH_FILTER = DropTrainerEpochLine()


def configure_logging(should_log: bool = True) -> None:
    """Our INFO lines (on the process that logs), transformers at WARNING, no per-file progress bars."""
    import huggingface_hub.utils
    import transformers

    level = logging.INFO if should_log else logging.WARNING
    logging.basicConfig(format=LOG_FORMAT, level=level)
    logging.getLogger("simmim_hf").setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING)
    transformers.utils.logging.enable_explicit_format()
    trainer_logger = transformers.utils.logging.get_logger("transformers.trainer")
    if _EPOCH_FILTER not in trainer_logger.filters:
        trainer_logger.addFilter(_EPOCH_FILTER)
    # "Loading weights" / "Writing model shards" bars; keep the Hub's (uploads can be long).
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()


def log_line(step: int, logs: dict[str, Any]) -> str:
    """One training log line: `step N: {...}` with floats at 4 significant digits and `total_flos` left out (it is
    in the run summary)."""
    shown = {key: f"{value:.4g}" if isinstance(value, float) else value for key, value in logs.items()}
    shown.pop("total_flos", None)
    return f"step {step}: {shown}"


class StepProgressCallback(ProgressCallback):
    """transformers' progress bar, whose log lines start with the optimizer step they were logged at."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs is not None:
            self.training_bar.write(log_line(state.global_step, logs))


class StepPrinterCallback(PrinterCallback):
    """The printer used with `--disable_tqdm true`, its lines starting with the optimizer step."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if state.is_local_process_zero and logs is not None:
            print(log_line(state.global_step, logs), flush=True)


def number_log_lines(trainer: Any) -> None:
    """Swaps the Trainer's stock progress bar or printer for the ones above (a notebook's progress widget and other
    callbacks are left as they are)."""
    for stock, ours in ((ProgressCallback, StepProgressCallback), (PrinterCallback, StepPrinterCallback)):
        for callback in list(trainer.callback_handler.callbacks):
            if type(callback) is stock:
                trainer.callback_handler.remove_callback(callback)
                trainer.callback_handler.add_callback(ours)


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M"


def _size(value: Any) -> str:
    return f"{value[0]}x{value[1]}" if isinstance(value, (list, tuple)) else f"{value}"


def run_header(
    model_args: Any,
    data_args: Any,
    args: Any,
    config: Any,
    model: Any,
    dataset: Any,
    stats_source: str,
    resume: str | None = None,
) -> str:
    """The few lines that open a pretraining log: model, data, batch and learning rate (and why), steps, output."""
    parameters = sum(p.numel() for p in model.parameters())
    encoder = getattr(getattr(model, "simmim", None), "encoder", None)
    encoder_parameters = sum(p.numel() for p in encoder.parameters()) if encoder is not None else parameters
    model_line = (
        f"model    {config.encoder_type} ({'preset ' + str(config.preset) if config.preset else 'checkpoint'}"
        f"{', from ' + model_args.model_name_or_path if model_args.model_name_or_path else ''}): "
        f"{_millions(parameters)} parameters ({_millions(encoder_parameters)} in the encoder), "
        f"{_size(config.image_size)} px x {config.num_channels} channels, mask {config.mask_patch_size} px cells "
        f"x {config.mask_ratio}"
    )
    source = data_args.dataset_name
    if data_args.data_files:
        source += f" {data_args.data_files[0]}" + (
            f" (+{len(data_args.data_files) - 1})" if len(data_args.data_files) > 1 else ""
        )
    shards = getattr(dataset, "num_shards", None)
    readers = args.world_size * max(1, args.dataloader_num_workers)
    shard_text = (
        f"{shards} shard(s) per rank ({args.world_size} rank(s) x {max(1, args.dataloader_num_workers)} reader(s))"
        if shards is not None
        else f"map-style, {args.world_size} rank(s)"
    )
    data_line = f"data     {source}: {shard_text}" + (
        "" if shards is None or shards % max(1, readers // args.world_size) == 0 else " - uneven over readers"
    )
    stats_line = (
        f"stats    mean {[round(v, 4) for v in config.image_mean]} std {[round(v, 4) for v in config.image_std]} "
        f"({stats_source})"
    )
    batch = args.global_batch_size
    lr_line = (
        f"batch    {args.per_device_train_batch_size} per device x {args.world_size} process(es) x "
        f"{args.gradient_accumulation_steps} accumulation = {batch}; {learning_rate_rule(args)}"
    )
    warmup = args.get_warmup_steps(args.max_steps)
    why = (
        f"default {args.default_warmup_ratio:g} of max_steps"
        if getattr(args, "warmup_origin", "given") == "default"
        else "--warmup_steps"
    )
    schedule = schedule_name(args)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    steps_line = (
        f"steps    {args.max_steps} ({batch * args.max_steps:,} images), {warmup} warmup ({why}), then {schedule}; "
        f"{precision} on {args.device.type}"
    )
    output_line = f"output   {args.output_dir} (checkpoint every {args.save_steps:g} steps"
    output_line += f", resuming from {resume})" if resume else ")"
    return "\n".join(["SimMIM pretraining", model_line, data_line, stats_line, lr_line, steps_line, output_line])
