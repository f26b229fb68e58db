#!/usr/bin/env python
"""Training-step throughput and peak memory: simmim_hf vs transformers' own SimMIM classes, same weights.

    python scripts/benchmark.py --preset vit-base-patch16-224 --batch_size 128 --precision bf16 --compile
    python scripts/benchmark.py --preset demo --steps 3 --warmup 1            # CPU smoke run

Each variant runs `--warmup` untimed then `--steps` timed optimizer steps (forward, backward, AdamW, zero_grad) on
random pixels with SimMIM masks, and reports images/s, ms/step and peak GPU memory. Variants:
  transformers      transformers' `*ForMaskedImageModeling` (the `run_mim.py` model), AdamW, given precision
  simmim_hf         our model, AdamW, given precision
  simmim_hf+fused   our model, fused AdamW, optionally torch.compile (`--compile`)
Results go to stdout as a table and, with `--output FILE`, as JSON (device, versions, settings, figures).

End to end (`--e2e`): the whole pretraining job, `scripts/pretrain.py --config configs/pretrain/demo.yaml`, against
`benchmarks/run_mim_baseline.py` (transformers' `run_mim.py` approach) on the same webdataset shards, same model and
optimiser settings, alternated in one call (ours, baseline, ours, baseline, ...) for each DataLoader worker count:

    python scripts/benchmark.py --e2e --e2e_data /tmp/fmnist-shards --e2e_steps 300 --e2e_workers 0,1,2 --repeats 2

Per-core decode + augmentation (`--decode`): scikit-image's bundled photographs re-encoded as JPEG (quality 90) at
500x375, 1024x768 and 1600x1200, decoded and augmented to 224x224 in this one process (one torch thread), ours
(`SimMIMAugmentation.decode_and_augment` with the per-image seeding, uint8 out) against plain PIL + torchvision
(`Image.open().convert("RGB")`, RandomResizedCrop 224, flip, ToTensor, Normalize), alternated, medians:

    python scripts/benchmark.py --decode --repeats 5

It reports, per side and worker count, the Trainer's training images/s (`train_samples_per_second`), the whole
process's wall time and CPU seconds (medians over `--repeats`), and the ratios ours / baseline. Without shards in
`--e2e_data` it writes them first (`scripts/prepare_data.py --source fashion-mnist --num_shards 8`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
import transformers
from transformers import HfArgumentParser

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator, to_transformers
from simmim_hf.configuration_simmim import to_pair


@dataclass
class BenchmarkArguments:
    preset: str = field(default="demo", metadata={"help": "SimMIMConfig preset to benchmark."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    steps: int = field(default=20, metadata={"help": "Timed steps per variant."})
    warmup: int = field(default=5, metadata={"help": "Untimed steps per variant (compilation happens here)."})
    precision: str = field(default="fp32", metadata={"help": "fp32, bf16 or fp16 (autocast)."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "eager or sdpa, for every variant."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the simmim_hf+fused variant."})
    variants: str = field(default="transformers,simmim_hf,simmim_hf+fused", metadata={"help": "Comma-separated."})
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "Device."})
    output: str | None = field(default=None, metadata={"help": "Write the results as JSON here."})
    e2e: bool = field(default=False, metadata={"help": "End-to-end jobs: ours vs the run_mim.py-style baseline."})
    e2e_data: str = field(
        default="/tmp/simmim-e2e-fashion-mnist", metadata={"help": "Shard folder (written if absent)."}
    )
    e2e_max_samples: int | None = field(default=None, metadata={"help": "Write only this many images (tests)."})
    e2e_steps: int = field(default=300, metadata={"help": "Training steps per end-to-end run."})
    e2e_batch_size: int = field(default=64, metadata={"help": "Per-device batch of the end-to-end runs."})
    e2e_workers: str = field(default="1", metadata={"help": "Comma-separated DataLoader worker counts."})
    e2e_overrides: str = field(default="", metadata={"help": "Encoder overrides for both sides (tests: tiny model)."})
    decode: bool = field(default=False, metadata={"help": "Per-core JPEG decode + augmentation, ours vs torchvision."})
    decode_seconds: float = field(default=1.0, metadata={"help": "Seconds per timed decode run."})
    repeats: int = field(default=2, metadata={"help": "Alternated runs per side and worker count (medians)."})


def build_models(args: BenchmarkArguments) -> tuple[SimMIMConfig, dict[str, torch.nn.Module]]:
    config = SimMIMConfig.from_preset(args.preset)
    config.encoder_config._attn_implementation = args.attn_implementation
    torch.manual_seed(0)
    ours = SimMIMForMaskedImageModeling(config)
    models: dict[str, torch.nn.Module] = {}
    for name in args.variants.split(","):
        if name == "transformers":
            if config.encoder_type not in ("vit", "deit", "swin", "swinv2"):
                print(f"skipping transformers baseline: no transformers SimMIM class for {config.encoder_type}")
                continue
            if config.encoder_type == "vit" and config.model_patch_size != config.encoder_stride:
                print("skipping transformers baseline: its ViT SimMIM needs patch_size == encoder_stride")
                continue
            models[name] = to_transformers(ours)
        elif name in ("simmim_hf", "simmim_hf+fused"):
            models[name] = SimMIMForMaskedImageModeling(config)
            models[name].load_state_dict(ours.state_dict())
        else:
            raise ValueError(f"variants: unknown variant {name!r}")
    return config, models


def time_variant(name: str, model: torch.nn.Module, config: SimMIMConfig, args: BenchmarkArguments) -> dict:
    device = torch.device(args.device)
    model = model.to(device).train()
    fused = name.endswith("+fused")
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=1e-4, weight_decay=0.05, fused=fused and device.type == "cuda"
    )
    step_model = torch.compile(model) if (fused and args.compile) else model
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    height, width = to_pair(config.image_size)
    pixel_values = torch.randn(args.batch_size, config.num_channels, height, width, device=device)
    masks = SimMIMMaskGenerator.from_config(config)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def step() -> None:
        mask = masks(args.batch_size, device=device)
        with autocast:
            loss = step_model(pixel_values, bool_masked_pos=mask).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    model.to("cpu")
    return {
        "variant": name + ("+compile" if fused and args.compile else ""),
        "images_per_second": round(args.batch_size * args.steps / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "peak_memory_gib": round(peak, 2) if peak is not None else None,
    }


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_RATE = re.compile(r"'train_samples_per_second': '?([0-9.]+)")


def _timed(command: list[str]) -> dict:
    """Runs a job; returns the Trainer's images/s (parsed from its final metrics line), wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rates = _RATE.findall(result.stdout + result.stderr)
    if not rates:
        raise RuntimeError(f"no train_samples_per_second in the output of {' '.join(command)}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {"images_per_second": float(rates[-1]), "wall_seconds": wall, "cpu_seconds": cpu}


def e2e_commands(args: BenchmarkArguments, workers: int, scratch: str) -> dict[str, list[str]]:
    data = os.path.join(args.e2e_data, "*.tar")
    common = ["--max_steps", str(args.e2e_steps)]
    ours = [sys.executable, "scripts/pretrain.py", "--config", "configs/pretrain/demo.yaml", "--data_files", data,
            "--per_device_train_batch_size", str(args.e2e_batch_size), "--dataloader_num_workers", str(workers),
            "--report_to", "none", "--output_dir", os.path.join(scratch, "ours"), *common]  # fmt: skip
    baseline = [sys.executable, "benchmarks/run_mim_baseline.py", "--data_files", data,
                "--batch_size", str(args.e2e_batch_size), "--num_workers", str(workers),
                "--output_dir", os.path.join(scratch, "baseline"), *common]  # fmt: skip
    if args.e2e_overrides:
        ours += ["--config_overrides", args.e2e_overrides, "--num_visualize_images", "2"]
        baseline += ["--config_overrides", args.e2e_overrides]
    return {"ours": ours, "baseline": baseline}


def run_e2e(args: BenchmarkArguments) -> dict:
    if not any(name.endswith(".tar") for name in (os.listdir(args.e2e_data) if os.path.isdir(args.e2e_data) else [])):
        command = [sys.executable, "scripts/prepare_data.py", "--source", "fashion-mnist", "--output", args.e2e_data,
                   "--num_shards", "8"]  # fmt: skip
        if args.e2e_max_samples:
            command += ["--max_samples", str(args.e2e_max_samples)]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    rows = []
    for workers in [int(w) for w in args.e2e_workers.split(",")]:
        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        for _ in range(args.repeats):
            for side in ("ours", "baseline"):
                with tempfile.TemporaryDirectory() as scratch:
                    runs[side].append(_timed(e2e_commands(args, workers, scratch)[side]))
        row = {"workers": workers, "runs": runs}
        for key in ("images_per_second", "wall_seconds", "cpu_seconds"):
            for side in runs:
                row[f"{side}_{key}"] = round(statistics.median(run[key] for run in runs[side]), 2)
        row["images_per_second_ratio"] = round(row["ours_images_per_second"] / row["baseline_images_per_second"], 3)
        row["wall_ratio"] = round(row["baseline_wall_seconds"] / row["ours_wall_seconds"], 3)
        rows.append(row)
    report = {
        "device": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": asdict(args),
        "e2e": rows,
    }
    print(f"{report['device']} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"e2e: {args.e2e_steps} steps x {args.e2e_batch_size}, medians of {args.repeats} alternated runs per side")
    print(f"{'workers':>7} {'ours img/s':>11} {'base img/s':>11} {'ratio':>6} {'ours wall':>10} {'base wall':>10} "
          f"{'ratio':>6} {'ours cpu':>9} {'base cpu':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['workers']:>7} {r['ours_images_per_second']:>11} {r['baseline_images_per_second']:>11} "
              f"{r['images_per_second_ratio']:>6} {r['ours_wall_seconds']:>10} {r['baseline_wall_seconds']:>10} "
              f"{r['wall_ratio']:>6} {r['ours_cpu_seconds']:>9} {r['baseline_cpu_seconds']:>9}")  # fmt: skip
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


DECODE_SIZES = ((500, 375), (1024, 768), (1600, 1200))


def photo_jpegs(width: int, height: int) -> list[bytes]:
    """scikit-image's bundled colour photographs, resized to `width` x `height`, as JPEG (quality 90)."""
    import io

    import numpy as np
    import PIL.Image
    import skimage.data

    encoded = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - a photo that needs a download is skipped
            continue
        if array.ndim != 3:
            continue
        image = PIL.Image.fromarray(np.asarray(array, dtype=np.uint8)[..., :3]).resize((width, height), 3)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def run_decode(args: BenchmarkArguments) -> dict:
    import io
    import random

    import PIL.Image
    from torchvision import transforms as T

    from simmim_hf.configuration_simmim import IMAGENET_MEAN, IMAGENET_STD
    from simmim_hf.data.images import CROP_RATIO, CROP_SCALE, SimMIMAugmentation, augmentation_seed

    torch.set_num_threads(1)
    ours = SimMIMAugmentation((224, 224), 3, IMAGENET_MEAN, IMAGENET_STD, uint8=True)
    reference = T.Compose(
        [
            T.RandomResizedCrop(224, scale=CROP_SCALE, ratio=CROP_RATIO),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    def ours_one(data: bytes, epoch: int) -> torch.Tensor:
        return ours.decode_and_augment(data, rng=random.Random(augmentation_seed(0, epoch, data)))

    def torchvision_one(data: bytes, epoch: int) -> torch.Tensor:
        return reference(PIL.Image.open(io.BytesIO(data)).convert("RGB"))

    def rate(function, photos: list[bytes]) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.decode_seconds:
            for data in photos:
                function(data, count)
                count += 1
        return count / (time.perf_counter() - start)

    rows = []
    for width, height in DECODE_SIZES:
        photos = photo_jpegs(width, height)
        rates: dict[str, list[float]] = {"ours": [], "torchvision": []}
        for _ in range(args.repeats):
            rates["ours"].append(rate(ours_one, photos))
            rates["torchvision"].append(rate(torchvision_one, photos))
        row = {"size": f"{width}x{height}", "photos": len(photos), "runs": rates}
        row.update({f"{side}_images_per_second": round(statistics.median(v), 1) for side, v in rates.items()})
        row["ratio"] = round(row["ours_images_per_second"] / row["torchvision_images_per_second"], 2)
        rows.append(row)
    report = {"device": device_name("cpu"), "torch": torch.__version__, "pillow": PIL.__version__,
              "settings": asdict(args), "decode": rows}  # fmt: skip
    print(f"{report['device']} | torch {torch.__version__} | Pillow {PIL.__version__} | one process, one thread")
    print(f"{'JPEG size':>10} {'photos':>6} {'ours img/s':>11} {'torchvision':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['size']:>10} {r['photos']:>6} {r['ours_images_per_second']:>11} "
              f"{r['torchvision_images_per_second']:>11} {r['ratio']:>6}")  # fmt: skip
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


def main() -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
    if args.decode:
        return run_decode(args)
    if args.e2e:
        return run_e2e(args)
    config, models = build_models(args)
    results = [time_variant(name, model, config, args) for name, model in models.items()]
    baseline = next((r["images_per_second"] for r in results if r["variant"] == "transformers"), None)
    for result in results:
        result["speedup_vs_transformers"] = round(result["images_per_second"] / baseline, 2) if baseline else None
    report = {
        "device": device_name(args.device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": asdict(args),
        "results": results,
    }
    print(f"{report['device']} | torch {torch.__version__} | transformers {transformers.__version__}")
    print(f"{args.preset}, batch {args.batch_size}, {args.precision}, attention {args.attn_implementation}")
    print(f"{'variant':28} {'img/s':>10} {'ms/step':>10} {'peak GiB':>9} {'speedup':>8}")
    for r in results:
        print(
            f"{r['variant']:28} {r['images_per_second']:>10} {r['ms_per_step']:>10} "
            f"{str(r['peak_memory_gib']):>9} {str(r['speedup_vs_transformers']):>8}"
        )
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
