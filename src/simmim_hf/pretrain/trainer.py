"""The pretraining engine: schedules, FLOPs for MFU, and `SimMIMTrainer`, the one Trainer class.

`pretrain.run` builds the model and the stream and hands them to `SimMIMTrainer`; the arguments live in
`pretrain.arguments`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import SchedulerType, Trainer, get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from simmim_hf.backbones import flops_per_image, no_weight_decay_names
from simmim_hf.configuration_simmim import to_pair
from simmim_hf.data.faults import FAULT_REASONS, add_counts
from simmim_hf.data.images import normalize_pixel_values
from simmim_hf.data.stream import StreamLoader
from simmim_hf.errors import RunFault, TrainingDiverged
from simmim_hf.pretrain.arguments import check_official_warmup, parse_milestones
from simmim_hf.pretrain.callbacks import NonFiniteGuard, RunEpoch
from simmim_hf.pretrain.checkpoints import (
    STAGING_PREFIX,
    checkpoint_write_fault,
    find_resume_checkpoint,
    load_weights_strictly,
    rotate_checkpoints,
)
from simmim_hf.pretrain.manifest import fsync_path, seal_checkpoint
from simmim_hf.pretrain.preemption import PreemptionGuard
from simmim_hf.publish.run_dir import RunDir, has_safetensors_weights

logger = logging.getLogger(__name__)


def warmup_multistep_lambda(warmup_steps: int, milestones: list[int], gamma: float) -> Callable[[int], float]:
    """LR multiplier at a step: linear warmup (step + 1) / warmup_steps, then x gamma at each milestone."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return gamma ** sum(step >= milestone for milestone in milestones)

    return factor


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, floor: float) -> Callable[[int], float]:
    """LR multiplier at a step: linear warmup (step + 1) / warmup_steps, then cosine from 1 down to `floor` at
    `total_steps`. After the warmup this is transformers' `cosine_with_min_lr` (`min_lr_rate=floor`) to 1e-12; its
    warmup is one step behind (step / warmup_steps, starting at 0), so SimMIM keeps this one."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def official_cosine_lambda(
    warmup_steps: int, total_steps: int, warmup_start: float, floor: float
) -> Callable[[int], float]:
    """microsoft/SimMIM's schedule (timm's `CosineLRScheduler` with `warmup_prefix=False`, `cycle_limit=1`, stepped
    per iteration) as a multiplier of the peak, at optimizer step `step` (0-based).

    With `t = max(step - 1, 0)` (the official loop updates the LR after each step with that step's index, so steps 0
    and 1 both run at the warmup start): `warmup_start + t * (1 - warmup_start) / warmup_steps` while
    `t < warmup_steps`; then `floor + (1 - floor) * 0.5 * (1 + cos(pi * t / total_steps))` - the cosine runs over the
    whole run, warmup included, so the peak itself is never reached - and `floor` from `t = total_steps` on."""

    def factor(step: int) -> float:
        t = max(step - 1, 0)
        if t < warmup_steps:
            return warmup_start + t * (1 - warmup_start) / warmup_steps
        if t >= total_steps:
            return floor
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / total_steps))

    return factor


def official_multistep_lambda(
    warmup_steps: int, milestones: list[int], gamma: float, warmup_start: float
) -> Callable[[int], float]:
    """microsoft/SimMIM's multistep schedule (its `MultiStepLRScheduler`, stepped per iteration; the ViT-B 800-epoch
    recipe) as a multiplier of the peak, at optimizer step `step` (0-based).

    With `t = max(step - 1, 0)` (as in `official_cosine_lambda`): `warmup_start + t * (1 - warmup_start) /
    warmup_steps` while `t < warmup_steps`; then `gamma ** (number of milestones <= t)`. The milestones count from
    step 0 (warmup included), and the official code requires the warmup to end by the first milestone."""
    check_official_warmup(warmup_steps, milestones)

    def factor(step: int) -> float:
        t = max(step - 1, 0)
        if t < warmup_steps:
            return warmup_start + t * (1 - warmup_start) / warmup_steps
        return gamma ** sum(t >= milestone for milestone in milestones)

    return factor


TRAINING_ARGS_JSON = "training_args.json"
TRAINING_ARGS_PICKLE = "training_args.bin"


class SimMIMTrainer(Trainer):
    """The HF Trainer with SimMIM's no-weight-decay set and schedules; everything else (DDP, FSDP, DeepSpeed,
    mixed precision, logging integrations) is the stock Trainer's, plus what long runs need:

    * with a `stream_loader`, the Trainer is fed from it (each rank reads only its own shards; no accelerate re-split,
      no rank-0 dispatch) and every checkpoint keeps the stream position, so resume continues the stream instead of
      replaying it; uint8 batches are normalised on the device with the model config's statistics;
    * every training log line carries images/s (and MFU on a known GPU), the run's data faults and NaN/Inf count;
    * resume restores every weight through transformers' own loading, strictly (any missing or unexpected tensor
      raises), where the stock Trainer loads the on-disk layout non-strictly into renamed modules;
    * checkpoints are written under `.tmp-checkpoint-N/`, sealed with a manifest of every file (size, SHA-256) and
      renamed to `checkpoint-N` once every process is done; a full disk removes the staging folder (`RunFault`);
    * a step whose loss or gradient norm is NaN/Inf is skipped (no update), logged and counted; `max_nonfinite_steps`
      in a row raise `TrainingDiverged`, and no checkpoint is written from a non-finite step;
    * the arguments are saved as token-free `training_args.json`, never as the `training_args.bin` pickle;
    * SIGTERM, SIGINT and SIGUSR1 stop all ranks after the same step, with its checkpoint (`pretrain.preemption`).
    """

    def __init__(self, *args: Any, stream_loader: StreamLoader | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_loader = stream_loader
        self.nonfinite_steps = 0
        self.nonfinite_in_a_row = 0
        self._nonfinite_flag: torch.Tensor | None = None
        self._staging_dir: Path | None = None
        self._throughput_mark: tuple[int, float] | None = None
        # Training time of earlier sessions of this run (restored on resume), so the card's wall time is the total.
        self.earlier_wall_time = 0.0
        self.session_start = time.perf_counter()
        # The run's settings record, saved in every checkpoint (set by `pretrain.run`; None: not saved).
        self.run_settings: dict[str, Any] | None = None
        self.add_callback(NonFiniteGuard(self))
        self.preemption = PreemptionGuard(self)
        self.add_callback(self.preemption)
        if stream_loader is not None:
            self.add_callback(RunEpoch(stream_loader))

    # -- the stream -----------------------------------------------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        if self.stream_loader is None:
            return super().get_train_dataloader()
        return self.stream_loader

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Moves the batch to the device, where uint8 `pixel_values` (the job's collated images) are normalised
        with the model config's `image_mean`/`image_std`; float pixel values pass unchanged."""
        inputs = super()._prepare_inputs(inputs)
        pixel_values = inputs.get("pixel_values") if isinstance(inputs, dict) else None
        if pixel_values is not None and pixel_values.dtype == torch.uint8:
            config = self.accelerator.unwrap_model(self.model).config
            inputs["pixel_values"] = normalize_pixel_values(pixel_values, config.image_mean, config.image_std)
        return inputs

    def stream_totals(self) -> tuple[dict[str, int], int]:
        """(data faults per reason, images skipped at resumes) for the whole run, summed over ranks (collective)."""
        faults = self.stream_loader.fault_counts() if self.stream_loader is not None else add_counts()
        skipped = self.stream_loader.skipped_at_resume if self.stream_loader is not None else 0
        if self.args.world_size > 1:
            values = torch.tensor([*(faults[r] for r in FAULT_REASONS), skipped], device=self.args.device)
            values = self.accelerator.reduce(values, reduction="sum").tolist()
            faults, skipped = dict(zip(FAULT_REASONS, map(int, values))), int(values[-1])
        return faults, skipped

    def wall_time(self) -> float:
        """Seconds of training of this run: earlier sessions' (restored on resume) plus this one's."""
        return self.earlier_wall_time + time.perf_counter() - self.session_start

    def restore_session(self, checkpoint: str | None) -> None:
        """Before training from `checkpoint` (or from scratch, None): restores this rank's stream position and the
        earlier sessions' wall time saved in it, and starts this session's clock."""
        if checkpoint and self.stream_loader is not None:
            # Every rank's state: with another number of ranks, the rest of the pass is dealt out anew.
            states = []
            while RunDir.stream_state_file(checkpoint, len(states)).is_file():
                states.append(json.loads(RunDir.stream_state_file(checkpoint, len(states)).read_text()))
            if states:
                own = states[self.args.process_index] if self.args.process_index < len(states) else None
                self.stream_loader.load_state_dict(own, all_ranks=states)
            else:
                logger.warning("No stream position in %s; the stream restarts from a fresh shuffle", checkpoint)
        wall_time = RunDir.wall_time_file(checkpoint) if checkpoint else None
        if wall_time is not None and wall_time.is_file():
            self.earlier_wall_time = json.loads(wall_time.read_text())["wall_time_seconds"]
        self.session_start = time.perf_counter()

    # -- resume -------------------------------------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        folder = Path(resume_from_checkpoint)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not has_safetensors_weights(folder):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        count = load_weights_strictly(target, folder)
        logger.info("Restored all %d weight tensors from %s", count, folder)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        self._load_saved_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and not self.is_deepspeed_enabled:
            changed = realign_schedule(self.optimizer, self.lr_scheduler, self.args.learning_rate)
            if changed is not None:
                logger.info("LR at step %d: %.3g from the checkpoint -> %.3g on this schedule", self.state.global_step,
                            *changed)  # fmt: skip

    def _load_saved_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # transformers < 5.2x maps the optimizer state to `args.device` when world_size > 1; on CPU processes that is
        # "cpu:0", which torch cannot restore to. Load plain DDP-on-CPU states here, on "cpu".
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if checkpoint is None or sharded or self.args.world_size == 1 or self.args.device.type != "cpu":
            return super()._load_optimizer_and_scheduler(checkpoint)
        folder = Path(checkpoint)
        if not ((folder / "optimizer.pt").is_file() and (folder / "scheduler.pt").is_file()):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True))

    # -- non-finite steps -----------------------------------------------------------------------------------------
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = super().training_step(*args, **kwargs)
        bad = ~torch.isfinite(loss.detach())
        self._nonfinite_flag = bad if self._nonfinite_flag is None else self._nonfinite_flag | bad
        return loss

    def _nonfinite_step(self) -> str:
        """What was not finite in the step about to be taken: "" (nothing), "loss" (any micro-batch, any process),
        "gradient norm", or both. One device sync and, with several processes, one tiny all-reduce per step, which
        also carries the preemption flag (`PreemptionGuard.take_agreement`)."""
        loss_flag = self._nonfinite_flag
        self._nonfinite_flag = None
        flags = torch.zeros(3, dtype=torch.int32, device=self.args.device)
        flags[2] = self.preemption.local_flag()
        if loss_flag is not None:
            flags[0] = loss_flag.reshape(()).to(torch.int32)
        clipped_norm, self._clipped_grad_norm = getattr(self, "_clipped_grad_norm", None), None
        if getattr(self.accelerator, "scaler", None) is None:  # with fp16 loss scaling, the scaler handles overflow
            if clipped_norm is not None:  # the Trainer's clipping just measured it: no second pass over the grads
                if hasattr(clipped_norm, "full_tensor"):  # a DTensor (FSDP2)
                    clipped_norm = clipped_norm.full_tensor()
                norm = torch.as_tensor(clipped_norm, dtype=torch.float32)
                flags[1] = (~torch.isfinite(norm)).to(flags.device, torch.int32)
            else:
                grads = [
                    p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None
                ]
                grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
                if grads:
                    flags[1] = (~torch.isfinite(torch.nn.utils.get_total_norm(grads))).to(flags.device, torch.int32)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        loss_bad, grad_bad, stop_signal = flags.tolist()
        self.preemption.take_agreement(stop_signal)
        return " and ".join(name for name, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad)

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        # Kept for `_nonfinite_step` (the pre-clip norm of this step's gradients, global under FSDP/DeepSpeed).
        self._clipped_grad_norm = super()._clip_grad_norm(model)
        return self._clipped_grad_norm

    def skip_nonfinite_step(self) -> None:
        """Called before every optimizer step: on a non-finite step, drops the gradients so that the optimizer
        changes no weight and no state (the LR schedule still advances with the step count)."""
        if self.is_deepspeed_enabled:
            return  # DeepSpeed steps inside its engine and has its own overflow handling
        what = self._nonfinite_step()
        if not what:
            self.nonfinite_in_a_row = 0
            return
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        step = self.state.global_step + 1
        limit = getattr(self.args, "max_nonfinite_steps", 20)
        logger.warning(
            "step %d: non-finite %s, optimizer step skipped (%d in a row, %d in this run)",
            step,
            what,
            self.nonfinite_in_a_row,
            self.nonfinite_steps,
        )
        if self.nonfinite_in_a_row >= limit:
            last_good, _ = find_resume_checkpoint(self.args.output_dir)
            raise TrainingDiverged(
                f"the loss or gradient norm was NaN/Inf for {self.nonfinite_in_a_row} steps in a row (steps "
                f"{step - self.nonfinite_in_a_row + 1}-{step}, limit --max_nonfinite_steps {limit}): training stopped. "
                f"Last good checkpoint: {last_good or 'none'}. Lower --base_learning_rate or check the data, then rerun."
            )

    def _maybe_log_save_evaluate(self, tr_loss: Any, *args: Any, **kwargs: Any) -> None:
        super()._maybe_log_save_evaluate(tr_loss, *args, **kwargs)
        # The Trainer resets its loss accumulator with `tr_loss -= tr_loss`, which leaves a NaN in place: once logged,
        # a non-finite window must not poison the next ones.
        logged = getattr(self, "_globalstep_last_logged", None) == self.state.global_step
        if self.nonfinite_steps and logged and isinstance(tr_loss, torch.Tensor) and not torch.isfinite(tr_loss).all():
            tr_loss.zero_()

    # -- logging --------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # Training log lines are written on every rank at the same step, so the all-reduce is safe there.
            if self.stream_loader is not None:
                faults, _ = self.stream_totals()
                if any(faults.values()):
                    logs.update({f"data_faults/{reason}": count for reason, count in faults.items()})
            if self.nonfinite_steps:
                logs["nonfinite_steps"] = self.nonfinite_steps
        self._log_throughput(logs)
        super().log(logs, start_time)

    def _log_throughput(self, logs: dict[str, float]) -> None:
        """Adds images/s (and MFU on a known GPU) to a training log line, so TensorBoard and the progress bar show
        them alongside loss, learning rate and gradient norm."""
        now = time.perf_counter()
        step = self.state.global_step
        last = self._throughput_mark
        if "loss" in logs and last is not None and step > last[0]:
            rate = (step - last[0]) * self.args.global_batch_size / max(now - last[1], 1e-9)
            logs["images_per_second"] = round(rate, 2)
            peak = peak_flops(self.args.device)
            if peak is not None:
                model = self.accelerator.unwrap_model(self.model)
                logs["mfu"] = round(rate * training_flops_per_image(model) / (peak * self.args.world_size), 4)
        self._throughput_mark = (step, now)

    # -- atomic checkpoints -------------------------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging_dir) if self._staging_dir is not None else super()._get_output_dir(trial)

    def write_checkpoint_extras(self, folder: Path) -> None:
        """This process's files in the checkpoint `folder` (inside the staging folder, before the Trainer's own files:
        the checkpoint is renamed complete with them): its stream position, and on the main process the wall time."""
        if self.stream_loader is not None:
            path = RunDir.stream_state_file(folder, self.args.process_index)
            path.write_text(json.dumps(self.stream_loader.state_dict()))
        if self.is_world_process_zero():
            RunDir.wall_time_file(folder).write_text(json.dumps({"wall_time_seconds": self.wall_time()}))
            if self.run_settings is not None:  # the settings that made this checkpoint (`pretrain.run_settings`)
                RunDir.settings_file(folder).write_text(json.dumps(self.run_settings, indent=1))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        step = self.state.global_step
        if self.nonfinite_in_a_row:
            logger.warning("step %d was non-finite: no checkpoint written, the last good one stays", step)
            return
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:  # leftovers of a write that was killed
            for stale in run_dir.glob(f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        failure: Exception | None = None
        try:
            (staging / name).mkdir(parents=True, exist_ok=True)
            self.write_checkpoint_extras(staging / name)
            super()._save_checkpoint(model, trial)
        except Exception as error:  # a full disk (or a bug): every process reaches the agreement below first
            failure = error
        finally:
            self._staging_dir = None
        self._agree_on_checkpoint_write(failure, staging, step)  # every process has written its files
        if self.args.should_save:
            try:
                seal_checkpoint(staging / name)  # the manifest, last; every file and folder fsynced
            except Exception as error:
                failure = error
        self._agree_on_checkpoint_write(failure, staging, step)
        final = run_dir / name
        if self.args.should_save:
            if final.exists():  # left by an earlier session that went past the checkpoint resumed from
                shutil.rmtree(final)
            os.replace(staging / name, final)
            fsync_path(run_dir)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(str(final))

    def _agree_on_checkpoint_write(self, failure: Exception | None, staging: Path, step: int) -> None:
        """Collective (a barrier): when writing checkpoint `step` failed on any process, the main process removes
        its staging folder and every process raises, `RunFault` for a full disk or another I/O error (one line: the
        folder, the cause, the last complete checkpoint), the error itself for anything else."""
        flag = torch.tensor([failure is not None], dtype=torch.int32, device=self.args.device)
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        message = checkpoint_write_fault(failure, staging.parent, step)  # None only for a failure that is no I/O fault
        if message is None:
            raise failure
        raise RunFault(message)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Pushes a complete checkpoint folder (`--hub_strategy checkpoint|all_checkpoints`); the final model is
        published once, at the end, by the pretraining job."""
        if self._staging_dir is not None or not self.is_world_process_zero():
            return  # pushed once renamed, by `_save_checkpoint`
        strategy = str(self.args.hub_strategy).split(".")[-1].lower()
        if strategy not in ("checkpoint", "all_checkpoints"):
            return
        pending = getattr(self, "push_in_progress", None)
        if not self.args.hub_always_push and pending is not None and not pending.is_done():
            return
        from huggingface_hub import HfApi
        from transformers.utils.hub import PushInProgress

        job = HfApi().upload_folder(
            repo_id=self.hub_model_id,
            folder_path=checkpoint_folder,
            path_in_repo="last-checkpoint" if strategy == "checkpoint" else Path(checkpoint_folder).name,
            commit_message=f"Training in progress, step {self.state.global_step}, checkpoint",
            token=self.args.hub_token,
            run_as_future=True,
            revision=self.args.hub_revision,
        )
        if pending is None or pending.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            pending.jobs.append(job)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.should_save:  # the arguments as JSON (tokens redacted by `to_json_string`), not a pickle
            (folder / TRAINING_ARGS_PICKLE).unlink(missing_ok=True)
            (folder / TRAINING_ARGS_JSON).write_text(self.args.to_json_string())

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        skip = no_weight_decay_names(model)
        return [name for name, _ in model.named_parameters() if name not in skip]

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            optimizer = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = build_lr_scheduler(self.args, optimizer, num_training_steps)
            self._created_lr_scheduler = True
        return self.lr_scheduler


def build_lr_scheduler(
    args: Any, optimizer: torch.optim.Optimizer, num_training_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The run's LR schedule over `num_training_steps`: microsoft/SimMIM's (`--lr_schedule official`: its multistep
    with `--lr_milestones`, else its cosine), else warmup
    then multistep (`--lr_milestones`), SimMIM's cosine with a floor (`--min_learning_rate_ratio` > 0), or the stock
    transformers schedule `--lr_scheduler_type`. The multipliers are functions of the step (a `LambdaLR`), so a resume
    rebuilds the same schedule from the arguments and the checkpoint's step (`realign_schedule`)."""
    warmup = args.get_warmup_steps(num_training_steps)
    milestones = parse_milestones(args.lr_milestones) if getattr(args, "lr_milestones", None) else None
    floor = getattr(args, "min_learning_rate_ratio", 0.0)
    if getattr(args, "lr_schedule", "trainer") == "official" and milestones:
        factor = official_multistep_lambda(warmup, milestones, args.lr_gamma, args.warmup_start_ratio)
    elif getattr(args, "lr_schedule", "trainer") == "official":
        factor = official_cosine_lambda(warmup, num_training_steps, args.warmup_start_ratio, floor)
    elif milestones:
        factor = warmup_multistep_lambda(warmup, milestones, args.lr_gamma)
    elif SchedulerType(args.lr_scheduler_type) == SchedulerType.COSINE and floor > 0:  # an enum after parsing
        factor = warmup_cosine_lambda(warmup, num_training_steps, floor)
    else:
        return get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=warmup,
            num_training_steps=num_training_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def realign_schedule(
    optimizer: torch.optim.Optimizer, scheduler: Any, learning_rate: float
) -> tuple[float, float] | None:
    """After a resume: makes the restored optimizer and LR scheduler follow this session's schedule from the
    restored step. A checkpoint restores the peak LR it was saved with (`base_lrs`) and the LR of its step under its
    own schedule; when the peak changed (another global batch) or the schedule did (a raised `max_steps`), the next
    step would still run at the old value. Returns (old LR, new LR) of the first group when anything changed, else
    None (nothing is touched, so an unchanged resume stays bitwise)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    step = scheduler.last_epoch
    old = optimizer.param_groups[0]["lr"]
    targets = [learning_rate * factor(step) for factor in scheduler.lr_lambdas]
    if (
        scheduler.base_lrs == [learning_rate] * len(scheduler.base_lrs)
        and [group["lr"] for group in optimizer.param_groups] == targets
    ):
        return None
    scheduler.base_lrs = [learning_rate] * len(scheduler.base_lrs)
    for group, target in zip(optimizer.param_groups, targets, strict=True):
        group["initial_lr"], group["lr"] = learning_rate, target
    scheduler._last_lr = list(targets)
    return old, targets[0]


# Dense bf16 peak FLOP/s per GPU, for MFU (matched on the CUDA device name).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # Longest key first, so an "L40S" is not read as an "L4".
    return next((PEAK_BF16_FLOPS[key] for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if key in name), None)


def training_flops_per_image(model: nn.Module) -> float:
    """Approximate training FLOPs per image of a SimMIM model, by its backbone's rule
    (`backbones.flops_per_image`) over its matmul parameters and patches per image."""
    config = model.config
    height, width = to_pair(config.image_size)
    tokens = (height // config.model_patch_size) * (width // config.model_patch_size)
    matmul_params = sum(p.numel() for p in model.parameters() if p.ndim >= 2)
    return flops_per_image(config, matmul_params, tokens)
