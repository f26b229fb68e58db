"""Helpers shared by the end-to-end pretraining tests (test_pretrain.py, test_faults.py) and scripts/fault_matrix.py:
subprocess runs of scripts/pretrain.py (or tests/pretrain_probe.py) with a tiny ViT on Fashion-MNIST shards."""

import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import PIL.Image

from simmim_hf.publish.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64"
PROBE_SCRIPT = "tests/pretrain_probe.py"
PROBE = [sys.executable, PROBE_SCRIPT]
# Two CPU processes over gloo (no GPU visible, accelerate told to stay on the CPU).
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip


def make_shards(output: Path, num_shards: int = 4, max_samples: int = 256) -> list[str]:
    """`max_samples` Fashion-MNIST images in `num_shards` webdataset tar shards, written by scripts/prepare_data.py."""
    run([sys.executable, "scripts/prepare_data.py", "--source", "fashion-mnist", "--output", str(output),
         "--num_shards", str(num_shards), "--max_samples", str(max_samples), "--overwrite", "true"])  # fmt: skip
    return sorted(str(p) for p in Path(output).glob("*.tar"))


def write_png_tar(path: Path, images: Iterable["PIL.Image.Image | bytes"]) -> Path:
    """A webdataset shard at `path` (folders made): one `{index:09d}.png` member per image, a PIL image saved as
    PNG or bytes stored as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for index, image in enumerate(images):
            if isinstance(image, PIL.Image.Image):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                image = buffer.getvalue()
            info = tarfile.TarInfo(f"{index:09d}.png")
            info.size = len(image)
            tar.addfile(info, io.BytesIO(image))
    return path


def launch(command, env=None, timeout=600) -> subprocess.CompletedProcess:
    """Runs `command` from the repository root on the CPU, offline; returns the finished process, whatever its
    exit status."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment, timeout=timeout)


def run(command, env=None):
    """`launch`, asserting exit status 0."""
    result = launch(command, env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def in_background(job: Callable, *args) -> Future:
    """`job(*args)` (e.g. `launch` of a command) on a thread of its own, started now; `.result()` waits for it and
    re-raises what it raised. Independent end-to-end runs overlap this way: most of a tiny run is the interpreter
    importing torch and transformers on one core, so two at once take little longer than one."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(job, *args)
    pool.shutdown(wait=False)
    return future


def together(*jobs: tuple) -> list:
    """Runs each `(job, *args)` at once (each on its own thread); their results, in order."""
    futures = [in_background(*job) for job in jobs]
    return [future.result() for future in futures]


def pretrain_args(shards, output_dir, max_steps, *extra, preset="demo", overrides=TINY):
    return [
        "--preset", preset, "--config_overrides", overrides,
        "--dataset_name", "webdataset", "--data_files", *shards, "--streaming", "true",
        "--output_dir", str(output_dir), "--max_steps", str(max_steps),
        "--per_device_train_batch_size", "16", "--base_learning_rate", "0.08", "--warmup_steps", "2",
        "--logging_steps", "1", "--save_steps", "1000", "--report_to", "none", "--seed", "7",
        "--shuffle_buffer_size", "1", "--num_visualize_images", "4", "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


def read_batches(probe: Path, rank: int = 0) -> list[list[str]]:
    return [line.split() for line in (probe / f"samples-rank{rank}.txt").read_text().splitlines()]


def loss_curve(output_dir: Path) -> list[list]:
    return RunDir(output_dir).read_summary()["loss_curve"]


def folder_digest(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to show that a run changed nothing."""
    return {
        str(path.relative_to(folder)): path.read_bytes() for path in sorted(Path(folder).rglob("*")) if path.is_file()
    }


# -- checkpoint damages, shared by tests/test_checkpoint_integrity.py and scripts/fault_matrix_cluster.py --------
def safetensors_data_start(path: Path) -> tuple[int, dict]:
    """(offset of the first tensor byte, header) of a safetensors file."""
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    return 8 + header_size, json.loads(path.read_bytes()[8 : 8 + header_size])


def xor_64_bytes(folder: Path) -> None:
    """A damage: 64 bytes in the middle of the checkpoint's tensor data XORed (a bit flip the loader does not see)."""
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    start = (safetensors_data_start(path)[0] + len(data)) // 2
    data[start : start + 64] = bytes(b ^ 0xA5 for b in data[start : start + 64])
    path.write_bytes(bytes(data))


def nan_bytes(folder: Path) -> None:
    """Overwrites the first 16 values of the largest float32 tensor with NaN (valid file, finite no more)."""
    path = folder / "model.safetensors"
    start, header = safetensors_data_start(path)
    tensors = [entry for key, entry in header.items() if key != "__metadata__" and entry["dtype"] == "F32"]
    first = (
        start + max(tensors, key=lambda entry: entry["data_offsets"][1] - entry["data_offsets"][0])["data_offsets"][0]
    )
    data = bytearray(path.read_bytes())
    data[first : first + 64] = bytes.fromhex("0000c07f") * 16
    path.write_bytes(bytes(data))


def cut(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    """A damage: the checkpoint file `name` cut to `keep` of its size."""

    def corrupt(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return corrupt
