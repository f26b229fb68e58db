"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop training at the next optimizer step with a complete checkpoint.

A cluster says "you are about to be killed" with a signal: SIGTERM (Kubernetes, spot VMs, `scancel`, torchrun and
`accelerate launch` forwarding theirs), SIGUSR1 (SLURM's `sbatch --signal=USR1@120`), SIGINT (Ctrl-C). While
`PreemptionGuard.installed()` is active (around `Trainer.train`), the handler only records the signal. At each
optimizer step the ranks agree on it with one MAX all-reduce (piggy-backed on the NaN/Inf check of
`SimMIMTrainer._nonfinite_step`; an all-reduce of its own where that check does not run), so a signal that reached
only some ranks stops all of them after the same step. That step is then logged and saved through the Trainer's
atomic checkpoint path (`SimMIMTrainer._save_checkpoint`: staging folder, then rename), and `Preempted` is raised on
every rank; `cli.run_script` turns it into one `stopped:` line and the exit status:

* SIGTERM, SIGUSR1: `--preemption_exit_code` (default 143 = 128 + SIGTERM, what a process killed by SIGTERM
  reports, so schedulers and requeue scripts treat it as a preemption, not a failure);
* SIGINT: 130 (128 + SIGINT, the shell's convention for Ctrl-C).

Signals that arrive once the stop is agreed (a launcher forwarding one the rank already got, an impatient second
Ctrl-C) are ignored until the checkpoint is complete, and logged. The previous handlers are restored when training
ends, however it ends. Rerunning the same command resumes from the checkpoint as after any kill, bitwise.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from simmim_hf.errors import Preempted
from simmim_hf.pretrain.checkpoints import find_resume_checkpoint, incompleteness

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
DEFAULT_PREEMPTION_EXIT_CODE = 128 + signal.SIGTERM  # 143
SIGINT_EXIT_CODE = 128 + signal.SIGINT  # 130


def exit_code_for(signum: int, preemption_exit_code: int = DEFAULT_PREEMPTION_EXIT_CODE) -> int:
    """The exit status after a stop by `signum`: 130 for SIGINT, `preemption_exit_code` for SIGTERM and SIGUSR1."""
    return SIGINT_EXIT_CODE if signum == signal.SIGINT else preemption_exit_code


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionGuard(TrainerCallback):
    """The signal flag of one process, the agreement of the ranks at each step, and the stop (see the module
    docstring). `SimMIMTrainer` creates one and adds it as a callback; `pretrain.run.train` wraps `Trainer.train` in
    `installed()`."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.received = 0  # the first signal this process got, 0 for none (written by the handler only)
        self.ignored: list[int] = []  # signals that arrived once the stop was agreed
        self.stop_signal = 0  # the signal the ranks agreed on (0: training goes on)
        self.stop_step: int | None = None
        self._agreed_this_step: int | None = None

    # -- the handler ---------------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        # Only records: everything else happens at the next step boundary, in the training loop.
        if self.stop_signal:
            self.ignored.append(signum)
        elif not self.received:
            self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[PreemptionGuard]:
        """Catches SIGTERM, SIGINT and SIGUSR1 in this process for the duration; restores the previous handlers
        after, whether training finished, stopped or failed. Outside the main thread (no handlers there) a no-op."""
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in PREEMPTION_SIGNALS:
                previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    # -- the agreement ---------------------------------------------------------------------------------------------
    def local_flag(self) -> int:
        """This process's signal (0 for none), for an all-reduce that another check already makes."""
        return self.received

    def take_agreement(self, value: int) -> None:
        """The MAX over ranks of `local_flag()`, from the all-reduce that carried it this step."""
        self._agreed_this_step = int(value)

    def agree(self) -> int:
        """The signal any rank received (the largest number if several; 0 for none), the same on every rank: one
        MAX all-reduce with several processes. Collective: every rank calls it at the same point."""
        args = self.trainer.args
        if args.world_size <= 1 or not torch.distributed.is_initialized():
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int32, device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # -- the stop --------------------------------------------------------------------------------------------------
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        agreed = self._agreed_this_step if self._agreed_this_step is not None else self.agree()
        self._agreed_this_step = None
        if not agreed:
            return
        self.stop_signal, self.stop_step = agreed, state.global_step
        if self.trainer.is_world_process_zero():
            logger.warning(
                "%s received: stopping after step %d, writing %s-%d first",
                signal_name(agreed),
                state.global_step,
                PREFIX_CHECKPOINT_DIR,
                state.global_step,
            )
        # The Trainer logs this step's loss and saves it right after this callback (its own atomic path), then
        # `on_save` stops. A step that is a save step anyway is saved once.
        control.should_log = True
        control.should_save = True
        control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_signal:
            self.stop()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # A signal after the last step's agreement: the final checkpoint is written (or written now); stop there too.
        if self.stop_signal:
            return
        agreed = self.agree()
        if not agreed:
            return
        self.stop_signal, self.stop_step = agreed, state.global_step
        if incompleteness_or_missing(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"):
            self.trainer._save_checkpoint(self.trainer.model, trial=None)
        self.stop()

    def stop(self) -> None:
        """After the checkpoint of the stop step: logs the signals ignored meanwhile and raises `Preempted`."""
        for signum in self.ignored:
            logger.warning("%s received while the checkpoint was written: ignored", signal_name(signum))
        self.ignored.clear()
        args = self.trainer.args
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.stop_step}"
        name = signal_name(self.stop_signal)
        if incompleteness_or_missing(folder) is None:
            saved = f"checkpoint written: {folder}"
        else:  # e.g. a non-finite step, which is never saved
            last_good, _ = find_resume_checkpoint(args.output_dir)
            saved = f"no checkpoint of step {self.stop_step} (last good checkpoint: {last_good or 'none'})"
        close_progress_bar(self.trainer)
        code = exit_code_for(self.stop_signal, getattr(args, "preemption_exit_code", DEFAULT_PREEMPTION_EXIT_CODE))
        raise Preempted(
            f"{name} after step {self.stop_step} of {args.max_steps}; {saved}; rerun the same command to resume "
            f"(exit status {code})",
            exit_code=code,
            report=self.trainer.is_local_process_zero(),
        )


def close_progress_bar(trainer: Any) -> None:
    """Ends the Trainer's progress bar (its `on_train_end` will not run), so the final line stands alone."""
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if isinstance(callback, ProgressCallback) and bar is not None:
            bar.close()
            callback.training_bar = None


def incompleteness_or_missing(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (None when it is one)."""
    return incompleteness(folder) if folder.is_dir() else "missing"
