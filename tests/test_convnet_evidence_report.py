"""scripts/convnet_evidence_report.py turns a convnet_evidence.sh run folder into the figures RESULTS.md quotes."""

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image


def _fake_runs(root: Path) -> None:
    for mode, offset in (("sparse", 0.0), ("token", 0.1)):
        run = root / mode
        run.mkdir(parents=True)
        curve = [[step, 1.0 - step / 100 + offset] for step in range(10, 60, 10)]
        (run / "simmim_run.json").write_text(json.dumps({"max_steps": 50, "loss_curve": curve}))
        Image.new("RGB", (8, 8), (1, 2, 3)).save(run / "reconstruction.png")
    (root / "eval").mkdir()
    for name, value in (("sparse", 0.75), ("token", 0.7), ("random", 0.6)):
        for seed in (0, 1):
            results = [
                {"protocol": "finetune", "metric": "accuracy", "value": value + 0.01 * seed},
                {"protocol": "finetune", "metric": "top5_accuracy", "value": 0.95},
            ]
            (root / "eval" / f"{name}-seed{seed}.json").write_text(json.dumps({"results": results}))
    walls = "pretrain-sparse\t11\npretrain-token\t12\nfinetune-sparse-seed0\t3\nfinetune-sparse-seed1\t4\n"
    (root / "wall_times.tsv").write_text(walls)


def test_report_writes_tables_plot_and_pictures(tmp_path: Path) -> None:
    _fake_runs(tmp_path / "runs")
    out = tmp_path / "bench"
    command = [sys.executable, "scripts/convnet_evidence_report.py", "--runs", str(tmp_path / "runs")]
    result = subprocess.run(
        [*command, "--output_dir", str(out), "--seeds", "0", "1"], capture_output=True, text=True, check=True
    )
    text = (out / "convnet_evidence_50.md").read_text()
    assert result.stdout == text
    assert "| sparse pretraining | 75.0 (95.0) | 76.0 (95.0) | 75.5 | 3, 4 |" in text
    assert "| random init | 60.0 (95.0) | 61.0 (95.0) | 60.5 | -, - |" in text
    assert "| 50 | 0.5000 | 0.6000 |" in text  # 1 - 50/100, token + 0.1
    assert "| token | 12 |" in text
    plot = Image.open(out / "convnet_loss_50.png").convert("RGB")
    colours = {colour for _, colour in plot.getcolors(plot.width * plot.height)}
    assert {(31, 119, 180), (214, 39, 40)} <= colours  # both curves drawn
    for mode in ("sparse", "token"):
        picture = Image.open(out / f"convnet_reconstruction_{mode}_50.png").convert("RGB")
        assert picture.getpixel((0, 0)) == (1, 2, 3)
