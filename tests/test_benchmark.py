"""scripts/benchmark.py must keep running (its figures are not checked here: speed targets live in benchmarks)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_run_writes_every_variant(tmp_path):
    output = tmp_path / "bench.json"
    command = [sys.executable, "scripts/benchmark.py", "--preset", "demo", "--batch_size", "4", "--steps", "1",
               "--warmup", "1", "--device", "cpu", "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert [r["variant"] for r in report["results"]] == ["transformers", "simmim_hf", "simmim_hf+fused"]
    assert all(r["images_per_second"] > 0 for r in report["results"])
    assert report["results"][0]["speedup_vs_transformers"] == 1.0
