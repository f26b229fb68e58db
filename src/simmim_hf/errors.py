"""The package's exception types.

`UsageError` is the one type for mistakes in what the user gave (arguments, config files, data paths, launch setup):
entry scripts catch it, print its message on one line (no traceback) and exit with status 2, before anything is
written to the output folder. Raise it with a message that names the field, file or key at fault.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A user input mistake; scripts report `str(error)` on one line and exit with status 2."""


class TrainingDiverged(RuntimeError):
    """Training stopped after `--max_nonfinite_steps` NaN/Inf steps in a row; scripts report it on one line."""


class RunFault(RuntimeError):
    """A fault of the machine or its files that stops a job (e.g. no space left while a checkpoint is written);
    scripts report it on one line and exit with status 1."""


class HubPublishError(RuntimeError):
    """A push that cannot go ahead; the message says what to do about it."""


class NotARunDirError(HubPublishError, ValueError):
    """The folder given is not the output of a SimMIM pretraining run."""


class Preempted(RuntimeError):
    """Training stopped by a signal (SIGTERM, SIGINT, SIGUSR1) after writing a checkpoint. Scripts print the message
    as one `stopped: ...` line (where `report`: one process per machine) and exit with `exit_code`."""

    def __init__(self, message: str, exit_code: int, report: bool = True) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.report = report
