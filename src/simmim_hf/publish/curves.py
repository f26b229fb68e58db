"""`curves.png` of a run folder: reconstruction loss and (when monitored) kNN top-1 against images seen, drawn from
`simmim_run.json` alone (`loss_curve`, `monitor_curve`, `monitor.baselines`, `settings_segments`), with PIL only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 520, 260, 48
COLOURS = {"curve": (31, 119, 180), "random_init": (214, 39, 40), "raw_pixels": (127, 127, 127)}


def images_at_step(step: int, segments: list[dict[str, Any]] | None, global_batch: int) -> int:
    """Images trained on after `step` steps, over the run's settings segments (a batch changed at a resume counts
    at its true value); without segments, `step x global_batch`."""
    if not segments:
        return step * global_batch
    total = 0
    for segment in segments:
        start, end = segment["from_step"], segment["to_step"]
        if step > start:
            total += (min(step, end) - start) * segment["global_batch_size"]
    last = segments[-1]
    if step > last["to_step"]:
        total += (step - last["to_step"]) * last["global_batch_size"]
    return total


def _panel(
    title: str, points: list[tuple[float, float]], lines: dict[str, float], y_range: tuple[float, float] | None
) -> Image.Image:
    """One plot: a polyline of `points` (x, y) and horizontal reference `lines` (name -> y), axes with end labels."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN + 12, 24, WIDTH - 12, HEIGHT - MARGIN
    draw.text((left, 6), title, fill="black")
    draw.rectangle((left, top, right, bottom), outline="black")
    finite = [(x, y) for x, y in points if y is not None and math.isfinite(y)]
    values = [y for _, y in finite] + list(lines.values())
    if not finite:
        draw.text((left + 8, top + 8), "no points", fill="black")
        return image
    low, high = y_range if y_range is not None else (min(values), max(values))
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    x_low, x_high = min(x for x, _ in finite), max(x for x, _ in finite)
    x_span = max(x_high - x_low, 1e-12)

    def at(x: float, y: float) -> tuple[float, float]:
        return left + (x - x_low) / x_span * (right - left), bottom - (y - low) / (high - low) * (bottom - top)

    for row, (name, value) in enumerate(lines.items()):
        y = at(x_low, value)[1]
        for x in range(int(left), int(right), 8):
            draw.line((x, y, min(x + 4, right), y), fill=COLOURS.get(name, (0, 0, 0)))
        draw.text((right - 140, top + 4 + 12 * row), f"{name.replace('_', ' ')} {value:.3f}", fill=COLOURS.get(name))
    xy = [at(x, y) for x, y in finite]
    if len(xy) > 1:
        draw.line(xy, fill=COLOURS["curve"], width=2)
    for x, y in xy:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=COLOURS["curve"])
    draw.text((4, top), f"{high:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{low:.3g}", fill="black")
    draw.text((left, bottom + 4), f"{x_low:,.0f}", fill="black")
    draw.text((right - 70, bottom + 4), f"{x_high:,.0f}", fill="black")
    draw.text(((left + right) // 2 - 30, bottom + 18), "images seen", fill="black")
    return image


def render_curves(summary: dict[str, Any]) -> Image.Image:
    """The loss panel, and below it the kNN panel when the run was monitored."""
    segments = summary.get("settings_segments")
    batch = int(summary.get("global_batch_size") or 1)
    loss = [(images_at_step(step, segments, batch), value) for step, value in summary.get("loss_curve") or []]
    panels = [_panel("reconstruction loss", loss, {}, None)]
    monitor = summary.get("monitor") or {}
    curve = summary.get("monitor_curve") or []
    if curve:
        knn = [(images, value) for _, images, value in curve]
        baselines = {k: v for k, v in (monitor.get("baselines") or {}).items() if v is not None}
        panels.append(_panel(f"kNN top-1 ({monitor.get('dataset', 'monitor set')})", knn, baselines, (0.0, 1.0)))
    canvas = Image.new("RGB", (WIDTH, HEIGHT * len(panels)), "white")
    for index, panel in enumerate(panels):
        canvas.paste(panel, (0, index * HEIGHT))
    return canvas


def save_curves(summary: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    render_curves(summary).save(path, format="PNG")
    return path
