"""Data faults stay local: broken shards and bad images are skipped, counted per reason, logged, never a crash.

The faults are built from real Fashion-MNIST images by scripts/fault_matrix_data.py (shared with the fault matrix).
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

import pytest

from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.faults import DataFaultError, add_counts
from simmim_hf.data.stream import DataArguments, StreamLoader, load_pretrain_dataset
from simmim_hf.errors import UsageError
from simmim_hf.masking import SimMIMMaskGenerator

ROOT = Path(__file__).resolve().parents[1]


def _load_script_module(name: str):
    # Loaded from its file: putting scripts/ on sys.path would shadow the `evaluate` package with scripts/evaluate.py.
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


faults = _load_script_module("fault_matrix_data")


@pytest.mark.parametrize("fault", faults.DATA_FAULTS, ids=lambda fault: fault.__name__)
def test_each_data_fault_is_handled_as_documented(fault, tmp_path, fashion_mnist_dir):
    row = fault(tmp_path)
    assert row["outcome"].startswith("handled"), row


@pytest.mark.parametrize(
    ("break_it", "kind", "expected_images"),
    [
        (faults.truncate_tar_end, "webdataset", 4 * faults.PER_SHARD - 1),
        (lambda path: faults.corrupt_tar_header(path, member=6), "webdataset", 3 * faults.PER_SHARD + 3),
        (faults.truncate_file, "parquet", 3 * faults.PER_SHARD),
    ],
    ids=["truncated-tar", "corrupt-header", "truncated-parquet"],
)
def test_a_broken_file_gives_one_warning_naming_it(
    break_it, kind, expected_images, tmp_path, fashion_mnist_dir, caplog
):
    write = faults.write_shards if kind == "webdataset" else faults.write_parquet_shards
    files = write(tmp_path)
    break_it(files[1])
    with caplog.at_level(logging.WARNING):
        images, counts = faults.read_one_pass(files, kind=kind)
    assert images == expected_images
    assert counts == {"undecodable": 0, "too_large": 0, "no_image": 0, "broken_file": 1}
    broken = [record.getMessage() for record in caplog.records if "broken_file" in record.getMessage()]
    assert len(broken) == 2  # the file's own warning, and the end-of-pass summary
    assert str(files[1]) in broken[0] and not any(str(path) in caplog.text for path in (files[0], files[2], files[3]))


def mixed_shards(folder: Path) -> list[Path]:
    """4 shards of 8 samples; shard 1 has a cut-off image, shard 2 a sample with no image, shard 3 is truncated."""
    files = faults.write_shards(folder)
    images = faults.fashion_images(2, offset=100)
    faults.write_tar(
        files[1],
        faults.sample_members(faults.fashion_images(7, 8), 8) + [("000099.png", faults.encode(images[0])[:50])],
    )
    faults.write_tar(files[2], faults.sample_members(faults.fashion_images(8, 16), 16) + [("000098.txt", b"no image")])
    faults.truncate_tar_end(files[3])
    return files


def stream_loader(files: list[Path], num_workers: int) -> StreamLoader:
    args = DataArguments(dataset_name="webdataset", data_files=[str(f) for f in files], shuffle_buffer_size=1)
    dataset = load_pretrain_dataset(args, seed=1, num_workers=num_workers, config=faults.CONFIG)
    collator = SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5), seed=1)
    return StreamLoader(dataset, collator, batch_size=2, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fault_totals_cover_every_worker_and_pass_and_survive_a_resume(tmp_path, fashion_mnist_dir, num_workers):
    files = mixed_shards(tmp_path)
    per_pass = {"undecodable": 1, "too_large": 0, "no_image": 1, "broken_file": 1}
    loader = stream_loader(files, num_workers)
    batches = iter(loader)
    while loader.epoch < 2:  # two whole passes
        next(batches)
    assert loader.fault_counts() == {reason: 2 * count for reason, count in per_pass.items()}

    interrupted = stream_loader(files, num_workers)
    batches = iter(interrupted)
    for _ in range(9):  # into the second half of the first pass
        next(batches)
    state = interrupted.state_dict()
    resumed = stream_loader(files, num_workers)
    resumed.load_state_dict(state)
    batches = iter(resumed)
    while resumed.epoch < 2:
        next(batches)
    assert resumed.fault_counts() == {reason: 2 * count for reason, count in per_pass.items()}


def test_max_image_pixels_is_a_data_argument_and_too_many_faults_stop_the_run(tmp_path, fashion_mnist_dir):
    files = faults.write_shards(tmp_path, num_shards=1, per_shard=4)  # 28 x 28 = 784 pixels each
    assert faults.read_one_pass(files, max_image_pixels=784) == (4, add_counts())
    with pytest.raises(DataFaultError, match=r"4 of the 4 examples .*\(too_large 4\).*--max_bad_fraction=0.5"):
        faults.read_one_pass(files, max_image_pixels=783)


# --- launch mistakes -----------------------------------------------------------------------------------------------


def check_usage_error(match: str, **data_args) -> None:
    with pytest.raises(UsageError, match=match):
        load_pretrain_dataset(DataArguments(**data_args), config=faults.CONFIG)


def test_data_mistakes_are_usage_errors_naming_the_argument(tmp_path, fashion_mnist_dir):
    files = faults.write_shards(tmp_path / "shards", num_shards=1, per_shard=2)
    check_usage_error(
        "--data_files: .*matches no file", dataset_name="webdataset", data_files=[str(tmp_path / "x-*.tar")]
    )
    check_usage_error(
        "--data_files: .*does not exist", dataset_name="webdataset", data_files=[str(tmp_path / "x.tar")]
    )
    check_usage_error("--data_files: .*is a folder", dataset_name="parquet", data_files=[str(tmp_path / "shards")])
    check_usage_error("--data_files: --dataset_name webdataset needs the shard files", dataset_name="webdataset")
    check_usage_error("--dataset_name: the folder .* does not exist", dataset_name=str(tmp_path / "no" / "such"))
    check_usage_error(
        "--data_dir: the folder .* does not exist", dataset_name="imagefolder", data_dir=str(tmp_path / "n")
    )
    if os.geteuid() != 0:  # root reads every file
        files[0].chmod(0)
        check_usage_error("not readable", dataset_name="webdataset", data_files=[str(files[0])])
    with pytest.raises(UsageError, match="--max_bad_fraction"):
        DataArguments(max_bad_fraction=0)
    with pytest.raises(UsageError, match="--max_image_pixels"):
        DataArguments(max_image_pixels=0)


def test_pretraining_reports_data_faults_in_summary_card_and_tensorboard(tmp_path, fashion_mnist_dir):
    import json
    import subprocess

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_pretrain import pretrain_args

    files = faults.write_shards(tmp_path / "shards")
    faults.truncate_tar_end(files[1])
    output = tmp_path / "run"
    extra = ("--per_device_train_batch_size", "8", "--report_to", "tensorboard")
    command = [sys.executable, "scripts/pretrain.py", *pretrain_args([str(f) for f in files], output, 8, *extra)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"file {files[1]}: ReadError" in result.stderr
    # 31 images a pass, 3 batches of 8: 8 steps are 2 whole passes and part of a third.
    summary = json.loads((output / "simmim_run.json").read_text())
    assert summary["data_faults"]["broken_file"] >= 2 and summary["images_skipped_at_resume"] == 0
    assert f"broken_file {summary['data_faults']['broken_file']}" in (output / "README.md").read_text()
    events = EventAccumulator(str(next((output / "runs").iterdir())))
    events.Reload()
    assert "train/data_faults/broken_file" in events.Tags()["scalars"]
