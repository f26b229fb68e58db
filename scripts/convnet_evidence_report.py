#!/usr/bin/env python
"""Tables and pictures of a `scripts/convnet_evidence.sh` run: fine-tuning accuracy of sparse vs token pretraining vs
random init, the two pretraining loss curves (figures and a PNG drawn from each run's `simmim_run.json`), the wall
times, and each run's `reconstruction.png` copied next to them.

python scripts/convnet_evidence_report.py --runs runs/convnet-evidence --output_dir benchmarks --seeds 0 1

Writes, with N the pretraining steps: convnet_evidence_N.md, convnet_loss_N.png, convnet_reconstruction_{sparse,token}_N.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

MODES = ("sparse", "token")
COLOURS = {"sparse": (31, 119, 180), "token": (214, 39, 40)}
MODELS = (("sparse pretraining", "sparse"), ("token pretraining", "token"), ("random init", "random"))


def load_curve(run: Path) -> list[tuple[int, float]]:
    """`[(step, loss), ...]` logged by the Trainer, from the run's `simmim_run.json`."""
    payload = json.loads((run / "simmim_run.json").read_text())
    return [(int(step), float(loss)) for step, loss in payload["loss_curve"]]


def finetune_figures(path: Path) -> dict[str, float]:
    """`{"accuracy": ..., "top5_accuracy": ...}` of an `evaluate.py` results file (finetune protocol)."""
    payload = json.loads(path.read_text())
    return {r["metric"]: r["value"] for r in payload["results"] if r["protocol"] == "finetune"}


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path, size: tuple[int, int] = (640, 400)) -> None:
    """Loss against step for each mode, on shared axes (no plotting library needed)."""
    width, height = size
    left, right, top, bottom = 60, 20, 20, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for curve in curves.values() for p in curve]
    max_step = max(s for s, _ in points)
    low, high = min(v for _, v in points), max(v for _, v in points)
    low, high = low - 0.05 * (high - low), high + 0.05 * (high - low)

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (width - left - right) * step / max_step
        y = top + (height - top - bottom) * (high - loss) / (high - low)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):
        step = max_step * i / 5
        x, _ = xy(step, low)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 6), f"{step:.0f}", fill="black")
        loss = low + (high - low) * i / 5
        _, y = xy(0, loss)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{loss:.3f}", fill="black")
    draw.text((width // 2 - 40, height - 20), "training step", fill="black")
    for row, (mode, curve) in enumerate(curves.items()):
        draw.line([xy(s, v) for s, v in curve], fill=COLOURS[mode], width=2)
        x0, y0 = width - right - 170, top + 10 + 16 * row
        draw.line([x0, y0 + 6, x0 + 20, y0 + 6], fill=COLOURS[mode], width=2)
        draw.text((x0 + 26, y0), f"{mode} masking (L1 loss)", fill="black")
    image.save(path)


def report(runs: Path, output_dir: Path, seeds: list[int]) -> Path:
    """Writes the tables and pictures of `runs` (fine-tunes of `seeds`) into `output_dir`; returns the Markdown
    file's path."""
    curves = {mode: load_curve(runs / mode) for mode in MODES}
    steps = json.loads((runs / "sparse" / "simmim_run.json").read_text())["max_steps"]
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(curves, output_dir / f"convnet_loss_{steps}.png")
    for mode in MODES:
        shutil.copyfile(runs / mode / "reconstruction.png", output_dir / f"convnet_reconstruction_{mode}_{steps}.png")
    walls = dict(
        line.split("\t") for line in (runs / "wall_times.tsv").read_text().splitlines() if line.strip()
    )  # later lines (reruns) win

    lines = [f"Fine-tuning, 1,000 labels (100 per class), full test set (10,000), {steps} pretraining steps;"]
    lines += ["accuracy (top-5) per fine-tuning seed, their mean, and the fine-tunes' wall times:", ""]
    head = " | ".join(f"seed {seed}" for seed in seeds)
    lines += [f"| encoder | {head} | mean | fine-tune wall (s) |", "|---" * (len(seeds) + 3) + "|"]
    for name, key in MODELS:
        figures = [finetune_figures(runs / "eval" / f"{key}-seed{seed}.json") for seed in seeds]
        cells = [f"{100 * f['accuracy']:.1f} ({100 * f['top5_accuracy']:.1f})" for f in figures]
        mean = 100 * sum(f["accuracy"] for f in figures) / len(figures)
        wall = ", ".join(walls.get(f"finetune-{key}-seed{seed}", "-") for seed in seeds)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean:.1f} | {wall} |")
    every = max(1, len(curves["sparse"]) // 10)
    lines += ["", "Pretraining loss (masked pixels, L1 in normalised units), as logged every 10 steps:", ""]
    lines += ["| step | " + " | ".join(MODES) + " |", "|---" * (len(MODES) + 1) + "|"]
    by_step = {mode: dict(curve) for mode, curve in curves.items()}
    shown = sorted({s for s, _ in curves["sparse"][every - 1 :: every]} | {curves["sparse"][-1][0]})
    for step in shown:
        lines.append(f"| {step} | " + " | ".join(f"{by_step[m].get(step, float('nan')):.4f}" for m in MODES) + " |")
    lines += ["", "| pretraining | wall (s) |", "|---|---|"]
    lines += [f"| {mode} | {walls.get(f'pretrain-{mode}', '-')} |" for mode in MODES]
    path = output_dir / f"convnet_evidence_{steps}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path("runs/convnet-evidence"), help="OUT of convnet_evidence.sh")
    parser.add_argument("--output_dir", type=Path, default=Path("benchmarks"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (eval/NAME-seedN.json)")
    args = parser.parse_args()
    path = report(args.runs, args.output_dir, args.seeds)
    print(path.read_text(), end="")


if __name__ == "__main__":
    main()
