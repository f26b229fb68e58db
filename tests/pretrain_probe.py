"""Runs scripts/pretrain.py with two test probes, for the end-to-end pretraining tests.

* The augmentation is made deterministic (resize + normalise), so an image always gives the same tensor and
  `samples-rank{R}.txt` (one line per batch: the sha1 of every example, in order) identifies what each rank read.
  SIMMIM_PROBE_REAL_AUGMENT=1 keeps the real one (random resized crop and flip, seeded per example): the digests are
  then those of the augmented tensors, which differ from pass to pass.
* After training each rank writes `weights-rank{R}.txt`, a digest of its parameters, and `world-rank{R}.txt`.
* A resumed rank writes, when training starts, the weights it restored (`resumed-model-rank{R}.safetensors`, by
  in-memory name) and its restored optimizer state (`resumed-optimizer-rank{R}.pt`).
* Faults, from the environment: SIMMIM_PROBE_KILL_AT_STEP=k (SIGKILL at the end of step k, before its checkpoint),
  SIMMIM_PROBE_KILL_IN_SAVE=k (SIGKILL while checkpoint k is written: weights and optimizer on disk, no trainer
  state yet), SIMMIM_PROBE_NAN_AT=3,4 (the loss of those steps is multiplied by NaN before the backward pass),
  SIMMIM_PROBE_DIGESTS=1 (`digests-rank{R}.txt`: step, weights digest, optimizer-state digest after every step),
  SIMMIM_PROBE_SIGNAL_AT_STEP=k:SIGTERM[:rank[:launcher]] (during step k, before its optimizer step, that rank
  (default 0) sends the signal to itself, or with `launcher` to its parent, the launcher, and waits until the
  launcher has forwarded it), SIMMIM_PROBE_SIGNAL_IN_SAVE=SIGTERM (that signal to itself, once, while the
  preemption checkpoint is written), SIMMIM_PROBE_ENOSPC_IN_SAVE=k (OSError ENOSPC while checkpoint k is written,
  after its weights and optimizer), SIMMIM_PROBE_PAUSE_AT_STEP=k (at the end of step k: writes `paused-rank{R}`,
  waits for a file `go` in PROBE_DIR), SIMMIM_PROBE_MONITOR=1 (each rank appends `step value` to
  `monitor-rank{R}.txt` for every kNN monitor figure, the session's random-init baseline first as step -1, and saves
  the gathered features of that baseline, `monitor-features-rank{R}.pt`, with the fresh model's weights,
  `monitor-model-rank{R}.pt`).
* Each rank writes its exit status to `exit-rank{R}.txt`.

Usage: python tests/pretrain_probe.py PROBE_DIR <pretrain.py arguments>  (also under `accelerate launch`).
"""

import errno
import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import simmim_hf.data.collate as collate  # noqa: E402
import simmim_hf.data.stream as data  # noqa: E402
import simmim_hf.pretrain.trainer as training  # noqa: E402

PROBE = Path(sys.argv.pop(1))
RANK = int(os.environ.get("RANK", "0"))


def deterministic_transform(config):
    size = config.image_size
    return v2.Compose(
        [
            v2.Lambda(lambda image: image.convert("RGB" if config.num_channels == 3 else "L")),
            v2.PILToTensor(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(config.image_mean, config.image_std),
        ]
    )


if not os.environ.get("SIMMIM_PROBE_REAL_AUGMENT"):
    data.build_pretrain_transform = deterministic_transform
original_call = collate.SimMIMCollator.__call__


def recording_call(self, examples):
    batch = original_call(self, examples)
    digests = [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] for x in batch["pixel_values"]]
    # Workers append too: one line per batch, written atomically enough for these tiny runs.
    with open(PROBE / f"collated-rank{RANK}-pid{os.getpid()}.txt", "a") as handle:
        handle.write(" ".join(digests) + "\n")
    return batch


collate.SimMIMCollator.__call__ = recording_call
original_get_loader = training.SimMIMTrainer.get_train_dataloader


class Recorder:
    """Wraps the train loader: records exactly the batches the Trainer consumed, in order."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            digests = [hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16] for x in batch["pixel_values"]]
            with open(PROBE / f"samples-rank{RANK}.txt", "a") as handle:
                handle.write(" ".join(digests) + "\n")
            yield batch


training.SimMIMTrainer.get_train_dataloader = lambda self: Recorder(original_get_loader(self))
import pretrain  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


def env_steps(name):
    return {int(step) for step in os.environ.get(name, "").split(",") if step.strip()}


def digest_of(tensors):
    digest = hashlib.sha1()
    for name, tensor in tensors:
        digest.update(str(name).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def optimizer_tensors(optimizer):
    state = optimizer.state_dict()["state"]
    return [(f"{index}.{key}", value) for index in sorted(state) for key, value in sorted(state[index].items())]


def signal_at_step():
    """(step, signal, rank, to the launcher) from SIMMIM_PROBE_SIGNAL_AT_STEP, or None."""
    text = os.environ.get("SIMMIM_PROBE_SIGNAL_AT_STEP")
    if not text:
        return None
    step, name, *rest = text.split(":")
    rank = int(rest[0]) if rest else 0
    return int(step), getattr(signal, name), rank, len(rest) > 1 and rest[1] == "launcher"


class FaultProbe(TrainerCallback):
    def __init__(self, trainer=None):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        planned = signal_at_step()
        if planned is None or planned[0] != state.global_step + 1 or planned[2] != RANK:
            return
        step, signum, _, to_launcher = planned
        os.kill(os.getppid() if to_launcher else os.getpid(), signum)
        deadline = time.monotonic() + 60
        while not self.trainer.preemption.received and time.monotonic() < deadline:
            time.sleep(0.01)  # the launcher forwards it asynchronously

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step > 0:  # resumed: what was restored, before any step
            from safetensors.torch import save_file

            tensors = {name: value.detach().cpu().contiguous().clone() for name, value in model.state_dict().items()}
            save_file(tensors, PROBE / f"resumed-model-rank{RANK}.safetensors")
            torch.save(optimizer.state_dict(), PROBE / f"resumed-optimizer-rank{RANK}.pt")

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if os.environ.get("SIMMIM_PROBE_DIGESTS"):
            line = f"{state.global_step} {digest_of(sorted(model.named_parameters()))} "
            line += digest_of(optimizer_tensors(optimizer))
            with open(PROBE / f"digests-rank{RANK}.txt", "a") as handle:
                handle.write(line + "\n")
        if state.global_step in env_steps("SIMMIM_PROBE_KILL_AT_STEP"):
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step in env_steps("SIMMIM_PROBE_PAUSE_AT_STEP"):
            (PROBE / f"paused-rank{RANK}").touch()
            deadline = time.monotonic() + 120
            while not (PROBE / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.05)


original_init = training.SimMIMTrainer.__init__


def init_with_probe(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(FaultProbe(self))


original_compute_loss = training.SimMIMTrainer.compute_loss


def compute_loss_with_nan(self, *args, **kwargs):
    result = original_compute_loss(self, *args, **kwargs)
    if self.state.global_step + 1 in env_steps("SIMMIM_PROBE_NAN_AT"):
        return result * float("nan") if isinstance(result, torch.Tensor) else (result[0] * float("nan"), *result[1:])
    return result


original_save_rng = training.SimMIMTrainer._save_rng_state


def save_rng_or_die(self, output_dir):
    if self.state.global_step in env_steps("SIMMIM_PROBE_KILL_IN_SAVE"):
        os.kill(os.getpid(), signal.SIGKILL)
    again = os.environ.get("SIMMIM_PROBE_SIGNAL_IN_SAVE")
    if again and self.preemption.stop_signal and not getattr(self, "_probe_signalled_in_save", False):
        self._probe_signalled_in_save = True
        os.kill(os.getpid(), getattr(signal, again))
    if self.state.global_step in env_steps("SIMMIM_PROBE_ENOSPC_IN_SAVE"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output_dir))
    original_save_rng(self, output_dir)


training.SimMIMTrainer.__init__ = init_with_probe

if os.environ.get("SIMMIM_PROBE_MONITOR"):
    import simmim_hf.pretrain.monitor as monitoring

    original_features, original_measure = monitoring.KNNMonitor.features, monitoring.KNNMonitor.measure

    def recorded_features(self, model):
        features = original_features(self, model)
        if not self.baselines and not (PROBE / f"monitor-features-rank{RANK}.pt").exists():
            torch.save(features.cpu(), PROBE / f"monitor-features-rank{RANK}.pt")
            torch.save(model.state_dict(), PROBE / f"monitor-model-rank{RANK}.pt")
        return features

    def recorded_measure(self, model):
        value = original_measure(self, model)
        step = self.trainer.state.global_step if self.baselines else -1
        with open(PROBE / f"monitor-rank{RANK}.txt", "a") as handle:
            handle.write(f"{step} {value!r}\n")
        return value

    monitoring.KNNMonitor.features = recorded_features
    monitoring.KNNMonitor.measure = recorded_measure
training.SimMIMTrainer.compute_loss = compute_loss_with_nan
training.SimMIMTrainer._save_rng_state = save_rng_or_die

if __name__ == "__main__":
    PROBE.mkdir(parents=True, exist_ok=True)
    original_train = training.SimMIMTrainer.train

    def train_and_fingerprint(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        digest = hashlib.sha1()
        for name, param in sorted(self.accelerator.unwrap_model(self.model).named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
        (PROBE / f"weights-rank{RANK}.txt").write_text(digest.hexdigest())
        (PROBE / f"world-rank{RANK}.txt").write_text(str(self.args.world_size))
        return result

    training.SimMIMTrainer.train = train_and_fingerprint
    from simmim_hf.cli import run_script

    try:
        run_script(pretrain.main)
    except SystemExit as done:
        (PROBE / f"exit-rank{RANK}.txt").write_text(str(done.code))
        raise
    (PROBE / f"exit-rank{RANK}.txt").write_text("0")
