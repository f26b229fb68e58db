"""What checkpoint verification costs next to the save itself (issue 22), for a preset's model with AdamW state.

Times, through the real `SimMIMTrainer._save_checkpoint`, a checkpoint written with sealing off (the save as it was
before manifests) and with it on, then the seal alone (fsync + SHA-256 of every file + the manifest) and the resume
check (`checkpoints.checkpoint_problem`: the manifest re-hashed and the safetensors weights read for NaN/Inf), and
the hashing and the NaN/Inf check alone.
Alternates the variants `--repeats` times and prints the medians as JSON.

    python benchmarks/checkpoint_verify.py --preset demo --output /tmp/ckpt-bench
    python benchmarks/checkpoint_verify.py --preset vit-base-patch16-224 --output /tmp/ckpt-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import simmim_hf.pretrain.trainer as trainer_module
from simmim_hf.configuration_simmim import SimMIMConfig, to_pair
from simmim_hf.masking import SimMIMMaskGenerator
from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
from simmim_hf.pretrain.checkpoints import checkpoint_problem
from simmim_hf.pretrain.manifest import checkpoint_files, file_digests, seal_checkpoint, weights_problem
from simmim_hf.pretrain.trainer import SimMIMTrainer


def trainer_with_state(preset: str, output: Path) -> SimMIMTrainer:
    """A Trainer whose model took one AdamW step (so the optimizer state is full size)."""
    config = SimMIMConfig.from_preset(preset)
    model = SimMIMForMaskedImageModeling(config)
    args = SimMIMTrainingArguments(
        output_dir=str(output), report_to="none", max_steps=10, use_cpu=not torch.cuda.is_available()
    )
    trainer = SimMIMTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    height, width = to_pair(config.image_size)
    pixels = torch.randn(2, config.num_channels, height, width, device=args.device)
    mask = SimMIMMaskGenerator.from_config(config)(2, generator=torch.Generator().manual_seed(0)).to(args.device)
    model.to(args.device)
    loss = model(pixel_values=pixels, bool_masked_pos=mask).loss
    loss.backward()
    trainer.optimizer.step()
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shutil.rmtree(args.output, ignore_errors=True)
    trainer = trainer_with_state(args.preset, args.output)
    sealing = trainer_module.seal_checkpoint
    times: dict[str, list[float]] = {
        key: [] for key in ("save_without_seal", "save_with_seal", "seal", "hash_only", "verify", "nan_check_only")
    }
    step = 0
    for _ in range(args.repeats):
        for variant in ("save_without_seal", "save_with_seal"):
            step += 1
            trainer.state.global_step = step
            trainer_module.seal_checkpoint = sealing if variant == "save_with_seal" else (lambda folder: None)
            start = time.perf_counter()
            trainer._save_checkpoint(trainer.model, None)
            times[variant].append(time.perf_counter() - start)
        folder = args.output / f"checkpoint-{step}"
        start = time.perf_counter()
        seal_checkpoint(folder)  # again, on the folder just written (in the page cache, as during training)
        times["seal"].append(time.perf_counter() - start)
        start = time.perf_counter()
        file_digests(folder, checkpoint_files(folder))
        times["hash_only"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert checkpoint_problem(folder) is None
        times["verify"].append(time.perf_counter() - start)
        start = time.perf_counter()
        assert weights_problem(folder) is None
        times["nan_check_only"].append(time.perf_counter() - start)
        for old in args.output.glob("checkpoint-*"):
            shutil.rmtree(old)
    trainer_module.seal_checkpoint = sealing
    median = {key: statistics.median(values) for key, values in times.items()}
    trainer.state.global_step = step + 1
    trainer._save_checkpoint(trainer.model, None)
    size = sum(p.stat().st_size for p in (args.output / f"checkpoint-{step + 1}").rglob("*") if p.is_file())
    print(
        json.dumps(
            {
                "preset": args.preset,
                "checkpoint_mb": round(size / 1e6, 1),
                "median_seconds": {key: round(value, 4) for key, value in median.items()},
                "seal_share_of_save": round(median["seal"] / median["save_without_seal"], 4),
                "verify_share_of_save": round(median["verify"] / median["save_without_seal"], 4),
                "hash_mb_per_s": round(size / 1e6 / median["hash_only"], 1),
                "repeats": args.repeats,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
