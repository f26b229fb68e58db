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
"""

from __future__ import annotations

import json
import platform
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


def main() -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses()
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
