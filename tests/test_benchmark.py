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


def test_e2e_benchmark_runs_both_sides_and_prints_the_ratio(tmp_path):
    output = tmp_path / "e2e.json"
    command = [sys.executable, "scripts/benchmark.py", "--e2e", "--e2e_data", str(tmp_path / "shards"),
               "--e2e_max_samples", "128", "--e2e_steps", "2", "--e2e_batch_size", "8", "--repeats", "1",
               "--e2e_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=2,intermediate_size=64",
               "--output", str(output)]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads(output.read_text())["e2e"]
    assert len(row["runs"]["ours"]) == len(row["runs"]["baseline"]) == 1
    assert row["ours_images_per_second"] > 0 and row["baseline_images_per_second"] > 0
    assert f"{row['images_per_second_ratio']}" in result.stdout and "ratio" in result.stdout
