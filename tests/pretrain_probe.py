"""Runs scripts/pretrain.py with two test probes, for the end-to-end pretraining tests.

* The augmentation is made deterministic (resize + normalise), so an image always gives the same tensor and
  `samples-rank{R}.txt` (one line per batch: the sha1 of every example, in order) identifies what each rank read.
* After training each rank writes `weights-rank{R}.txt`, a digest of its parameters, and `world-rank{R}.txt`.

Usage: python tests/pretrain_probe.py PROBE_DIR <pretrain.py arguments>  (also under `accelerate launch`).
"""

import hashlib
import os
import sys
from pathlib import Path

import torch
from torchvision.transforms import v2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import simmim_hf.collate as collate  # noqa: E402
import simmim_hf.data as data  # noqa: E402
import simmim_hf.pretraining as pretraining  # noqa: E402

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
original_get_loader = pretraining.StreamTrainer.get_train_dataloader


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


pretraining.StreamTrainer.get_train_dataloader = lambda self: Recorder(original_get_loader(self))
import pretrain  # noqa: E402

if __name__ == "__main__":
    PROBE.mkdir(parents=True, exist_ok=True)
    original_train = pretraining.StreamTrainer.train

    def train_and_fingerprint(self, *args, **kwargs):
        result = original_train(self, *args, **kwargs)
        digest = hashlib.sha1()
        for name, param in sorted(self.accelerator.unwrap_model(self.model).named_parameters()):
            digest.update(name.encode())
            digest.update(param.detach().cpu().numpy().tobytes())
        (PROBE / f"weights-rank{RANK}.txt").write_text(digest.hexdigest())
        (PROBE / f"world-rank{RANK}.txt").write_text(str(self.args.world_size))
        return result

    pretraining.StreamTrainer.train = train_and_fingerprint
    pretrain.main()
