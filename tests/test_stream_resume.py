"""Stream resume is exact: masks, augmentation and order continue as if the run had never stopped.

Real Fashion-MNIST images in WebDataset shards, the real augmentation (random resized crop + flip) and the real mask
generator; each rank's stream is built in-process with `load_pretrain_dataset(rank=, world_size=)`.
"""

import hashlib
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.stream import DataArguments, StreamLoader, load_pretrain_dataset
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data
from simmim_hf.masking import SimMIMMaskGenerator

NUM_IMAGES, NUM_SHARDS, BATCH, SEED = 64, 4, 4, 5
CONFIG = SimpleNamespace(image_size=16, num_channels=1, image_mean=[0.286], image_std=[0.353])
IDENTITY = v2.Compose([v2.PILToTensor()])


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """64 Fashion-MNIST test images in 4 WebDataset tar shards, written by the project's sharder."""
    output = tmp_path_factory.mktemp("resume-shards")
    prepare_data(
        PrepareDataArguments(
            source="fashion-mnist", output=str(output), num_shards=NUM_SHARDS, max_samples=NUM_IMAGES, split="test"
        )
    )
    return output


def data_args(shards: Path, buffer: int) -> DataArguments:
    return DataArguments(
        dataset_name="webdataset", data_files=[str(shards / "test-*.tar")], shuffle_buffer_size=buffer
    )


def simmim_loader(shards: Path, rank: int, num_workers: int, buffer: int = 1, world_size: int = 2) -> StreamLoader:
    dataset = load_pretrain_dataset(
        data_args(shards, buffer), seed=SEED, rank=rank, world_size=world_size, num_workers=num_workers, config=CONFIG
    )
    collator = SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5), seed=SEED, rank=rank)
    return StreamLoader(dataset, collator, batch_size=BATCH, num_workers=num_workers)


def take(loader: StreamLoader, count: int) -> list[dict[str, torch.Tensor]]:
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("rank", [0, 1])
def test_resumed_stream_equals_the_uninterrupted_one(shards, rank, num_workers):
    # Per rank: 2 shards, 32 images, 8 batches a pass. 12 batches cross into the second pass.
    reference = take(simmim_loader(shards, rank, num_workers), 12)
    first_pass, second_pass = reference[:8], reference[8:]
    # Masks and crops are random: the second pass is not a replay of the first.
    assert not torch.equal(first_pass[0]["bool_masked_pos"], second_pass[0]["bool_masked_pos"])
    assert not torch.equal(
        torch.cat([b["pixel_values"] for b in first_pass[:4]]), torch.cat([b["pixel_values"] for b in second_pass])
    )
    for k in (3, 8):  # mid-pass on an odd batch (worker 1's turn next), and exactly at the end of a pass
        interrupted = simmim_loader(shards, rank, num_workers)
        take(interrupted, k)
        state = interrupted.state_dict()
        resumed = simmim_loader(shards, rank, num_workers)
        resumed.load_state_dict(state)
        for index, batch in enumerate(take(resumed, 12 - k), start=k):
            for name in ("pixel_values", "bool_masked_pos"):
                assert torch.equal(batch[name], reference[index][name]), (k, index, name)
        assert resumed.skipped_at_resume == 0


def test_ranks_draw_different_masks_and_read_different_images(shards):
    rank0, rank1 = (take(simmim_loader(shards, rank, 0), 1)[0] for rank in (0, 1))
    assert not torch.equal(rank0["bool_masked_pos"], rank1["bool_masked_pos"])
    assert not torch.equal(rank0["pixel_values"], rank1["pixel_values"])


# --- with a real shuffle buffer ------------------------------------------------------------------------------------


def digest(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


class DigestCollator:
    def __call__(self, examples):
        return {"digests": [digest(example["pixel_values"]) for example in examples]}


def digest_loader(shards: Path, num_workers: int, buffer: int, world_size: int = 1) -> StreamLoader:
    dataset = load_pretrain_dataset(
        data_args(shards, buffer), seed=SEED, world_size=world_size, num_workers=num_workers, transform=IDENTITY
    )
    return StreamLoader(dataset, DigestCollator(), batch_size=BATCH, num_workers=num_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_a_buffer_reads_nothing_twice_and_logs_what_it_skips(shards, num_workers, caplog):
    buffer = 8
    loader = digest_loader(shards, num_workers, buffer)
    batches = iter(loader)
    seen = [d for _ in range(5) for d in next(batches)["digests"]]
    state = loader.state_dict()
    del batches

    resumed_loader = digest_loader(shards, num_workers, buffer)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        resumed_loader.load_state_dict(state)
    resumed = []
    for batch in resumed_loader:
        if resumed_loader.epoch != state["epoch"]:
            break
        resumed.extend(batch["digests"])
    skipped = resumed_loader.skipped_at_resume
    assert set(resumed).isdisjoint(seen) and len(set(resumed)) == len(resumed)
    assert 0 < skipped <= buffer * max(1, num_workers)
    # Every image of the pass is accounted for: consumed before, after, or skipped (minus the last partial batches).
    assert NUM_IMAGES - len(seen) - len(resumed) - skipped < BATCH * max(1, num_workers)
    assert f"{skipped} image(s) that sat in the shuffle buffer(s)" in caplog.text
    assert resumed_loader.state_dict()["skipped_at_resume"] == skipped


def test_resume_at_the_end_of_the_shards_moves_on_to_the_next_pass(shards, caplog):
    # Each rank has 32 images and a 100-image buffer: after the first batch every shard has been read and only the
    # buffer is left. Saved there, the pass has nothing left after a resume; the loader must start the next pass.
    reference = take(digest_loader(shards, 0, buffer=100, world_size=2), 9)
    interrupted = digest_loader(shards, 0, buffer=100, world_size=2)
    take(interrupted, 2)
    state = interrupted.state_dict()
    resumed = digest_loader(shards, 0, buffer=100, world_size=2)
    with caplog.at_level(logging.INFO, logger="simmim_hf.data.stream"):
        resumed.load_state_dict(state)
        first = take(resumed, 1)[0]
    assert resumed.epoch == 1
    assert first["digests"] == reference[8]["digests"]  # exactly the uninterrupted run's second pass
    assert resumed.skipped_at_resume == 32 - 2 * BATCH
    assert "had no full batch left" in caplog.text


def test_parquet_shards_resume_exactly(tmp_path, fashion_mnist_dir):
    prepare_data(
        PrepareDataArguments(
            source="fashion-mnist", output=str(tmp_path), num_shards=4, max_samples=32, split="test", format="parquet"
        )
    )
    args = DataArguments(dataset_name="parquet", data_files=[str(tmp_path / "*.parquet")], shuffle_buffer_size=1)

    def loader() -> StreamLoader:
        dataset = load_pretrain_dataset(args, seed=SEED, rank=1, world_size=2, num_workers=2, config=CONFIG)
        return StreamLoader(dataset, SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5), SEED, 1), BATCH, 2)

    reference = take(loader(), 6)  # 16 images a pass: 4 batches
    interrupted = loader()
    take(interrupted, 3)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    for batch, expected in zip(take(resumed, 3), reference[3:]):
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(batch["bool_masked_pos"], expected["bool_masked_pos"])
