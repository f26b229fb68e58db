"""Stream resume is exact: masks, augmentation and order continue as if the run had never stopped.

Real Fashion-MNIST images in WebDataset shards (the session fixture `shards`: 256 images, 4 shards), the real
augmentation (random resized crop + flip) and the real mask generator, with a real shuffle buffer; each rank's
stream is built in-process with `load_pretrain_dataset(rank=, world_size=)`. Changed layouts and shard lists are
checked image by image with a collator that keeps only a digest of each image.
"""

import hashlib
import logging
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.transforms import v2

from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.stream import DataArguments, StreamLoader, load_pretrain_dataset
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data
from simmim_hf.masking import SimMIMMaskGenerator

NUM_IMAGES, BATCH, SEED, BUFFER = 256, 16, 5, 64
CONFIG = SimpleNamespace(image_size=16, num_channels=1, image_mean=[0.286], image_std=[0.353])
IDENTITY = v2.Compose([v2.PILToTensor()])


def data_args(files, buffer: int) -> DataArguments:
    return DataArguments(dataset_name="webdataset", data_files=[str(f) for f in files], shuffle_buffer_size=buffer)


def simmim_loader(shards, rank: int, num_workers: int, world_size: int, buffer: int = BUFFER) -> StreamLoader:
    dataset = load_pretrain_dataset(
        data_args(shards, buffer), seed=SEED, rank=rank, world_size=world_size, num_workers=num_workers, config=CONFIG
    )
    collator = SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5), seed=SEED, rank=rank)
    return StreamLoader(dataset, collator, batch_size=BATCH, num_workers=num_workers)


def take(loader: StreamLoader, count: int) -> list[dict]:
    batches = iter(loader)
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize(
    ("world_size", "rank", "num_workers"), [(1, 0, 0), (1, 0, 1), (1, 0, 2), (2, 0, 0), (2, 1, 1)]
)
def test_resumed_stream_with_a_shuffle_buffer_equals_the_uninterrupted_one(shards, world_size, rank, num_workers):
    per_pass = NUM_IMAGES // world_size // BATCH  # every reader holds a multiple of BATCH images
    total = per_pass + 3  # into the second pass
    reference = take(simmim_loader(shards, rank, num_workers, world_size), total)
    # Masks and crops are random: the second pass is not a replay of the first.
    assert not torch.equal(reference[0]["bool_masked_pos"], reference[per_pass]["bool_masked_pos"])
    # Mid-pass on an odd batch, while the buffers are drawn out at the end of the pass, exactly at its end.
    for k in (3, per_pass - 1, per_pass):
        interrupted = simmim_loader(shards, rank, num_workers, world_size)
        take(interrupted, k)
        state = interrupted.state_dict()
        assert sum(len(w["state"]["buffer"]) for w in state["workers"].values()) > 0 or k == per_pass
        resumed = simmim_loader(shards, rank, num_workers, world_size)
        resumed.load_state_dict(state)
        for index, batch in enumerate(take(resumed, total - k), start=k):
            for name in ("pixel_values", "bool_masked_pos"):
                assert torch.equal(batch[name], reference[index][name]), (k, index, name)
        assert resumed.skipped_at_resume == 0


def test_ranks_draw_different_masks_and_read_different_images(shards):
    rank0, rank1 = (take(simmim_loader(shards, rank, 0, 2), 1)[0] for rank in (0, 1))
    assert not torch.equal(rank0["bool_masked_pos"], rank1["bool_masked_pos"])
    assert not torch.equal(rank0["pixel_values"], rank1["pixel_values"])


# --- image by image: digests -----------------------------------------------------------------------------------


def digest(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


class DigestCollator:
    def __call__(self, examples):
        return {"digests": [digest(example["pixel_values"]) for example in examples]}


def digest_loader(files, num_workers: int = 0, world_size: int = 1, rank: int = 0, buffer: int = BUFFER):
    dataset = load_pretrain_dataset(
        data_args(files, buffer), seed=SEED, rank=rank, world_size=world_size, num_workers=num_workers,
        transform=IDENTITY,
    )  # fmt: skip
    # Every image of a pass, the last short batch of each reader included (the job drops it: drop_last).
    return StreamLoader(dataset, DigestCollator(), batch_size=BATCH, num_workers=num_workers, drop_last=False)


def passes(loader: StreamLoader, count: int = 1) -> list[list[str]]:
    """The digests of the rest of the loader's pass and of the `count - 1` passes after it."""
    first, seen = loader.epoch, [[] for _ in range(count)]
    for batch in loader:
        if loader.epoch >= first + count:
            break
        seen[loader.epoch - first].extend(batch["digests"])
    return seen


def rest_of_pass(loader: StreamLoader) -> list[str]:
    return passes(loader)[0]


@pytest.fixture(scope="module")
def shard_digests(shards) -> dict[str, set[str]]:
    return {str(f): set(rest_of_pass(digest_loader([f], buffer=1))) for f in shards}


def interrupted_states(files, world_size: int, num_workers: int, batches: int) -> tuple[list[dict], list[str]]:
    """Each rank of an old run reads `batches` batches: (the state of every rank, the digests they consumed)."""
    states, seen = [], []
    for rank in range(world_size):
        loader = digest_loader(files, num_workers, world_size, rank)
        seen.extend(d for batch in take(loader, batches) for d in batch["digests"])
        states.append(loader.state_dict())
    return states, seen


def resumed_pass(files, states, world_size: int, num_workers: int) -> tuple[list[str], list[StreamLoader]]:
    seen, loaders = [], []
    for rank in range(world_size):
        loader = digest_loader(files, num_workers, world_size, rank)
        loader.load_state_dict(states[rank] if rank < len(states) else None, all_ranks=states)
        seen.extend(rest_of_pass(loader))
        loaders.append(loader)
    return seen, loaders


@pytest.mark.parametrize(
    ("old", "new"),
    [((1, 0), (2, 0)), ((1, 2), (1, 0)), ((2, 1), (1, 2)), ((2, 0), (1, 0))],
    ids=["1->2 ranks", "2->0 workers", "2x1->1x2", "2->1 ranks"],
)
def test_a_changed_layout_still_reads_each_image_of_the_pass_once(shards, shard_digests, old, new, caplog):
    states, before = interrupted_states(shards, *old, batches=3)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        after, loaders = resumed_pass(shards, states, *new)
    counts = Counter(before + after)
    everything = set().union(*shard_digests.values())
    twice = sum(1 for count in counts.values() if count > 1)
    never = len(everything - set(counts))
    assert (twice, never, len(before) + len(after)) == (0, 0, NUM_IMAGES), (twice, never)
    assert "dealt out anew" in caplog.text
    assert sum(loader.skipped_at_resume for loader in loaders) == 0


def test_layout_change_without_every_ranks_state_starts_the_next_pass(shards, caplog):
    states, _ = interrupted_states(shards, 2, 0, batches=2)
    loader = digest_loader(shards, 0, 1, 0)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        loader.load_state_dict(states[0])  # the saved run had 2 ranks; only rank 0's state is given
    assert loader.epoch == 1 and "not every rank's state" in caplog.text


@pytest.fixture
def copied(shards, tmp_path) -> list[Path]:
    paths = []
    for f in shards:
        paths.append(tmp_path / Path(f).name)
        shutil.copy(f, paths[-1])
    return paths


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_removed_shard_is_dropped_from_the_resumed_pass_and_the_others_keep_their_place(
    copied, shard_digests, num_workers, caplog
):
    states, before = interrupted_states(copied, 1, num_workers, batches=3)
    removed = copied[0]  # the first of the list: every other shard's index shifts, its position must not
    gone = shard_digests[str(next(f for f in shard_digests if Path(f).name == removed.name))]
    removed.unlink()
    loader = digest_loader(copied[1:], num_workers)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        loader.load_state_dict(states[0])
        after, following = passes(loader, 2)
    assert f"1 shard(s) of the saved pass are gone or changed size ({removed})" in caplog.text
    counts = Counter(before + after)
    assert max(counts.values()) == 1  # nothing twice
    kept = set().union(*(d for f, d in shard_digests.items() if Path(f).name != removed.name))
    assert kept <= set(counts) and set(after).isdisjoint(gone)  # every image of the other shards, none of it
    lost = len(gone - set(before))
    assert loader.skipped_at_resume <= lost  # the buffered images of the removed shard are counted as skipped
    assert set(following) == kept  # the next pass reads the 3 shards left


def test_a_new_shard_joins_at_the_next_pass(copied, shard_digests, caplog):
    old, new = copied[:3], copied[3]
    states, before = interrupted_states(old, 1, 0, batches=3)
    loader = digest_loader(copied)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        loader.load_state_dict(states[0])
        after, following = passes(loader, 2)
    assert f"1 new shard(s) ({new}) join at pass 1" in caplog.text
    by_name = {Path(f).name: d for f, d in shard_digests.items()}
    counts = Counter(before + after)
    assert max(counts.values()) == 1 and set(counts) == set().union(*(by_name[f.name] for f in old))
    assert set(following) == set().union(*by_name.values())
    assert loader.skipped_at_resume == 0


def test_a_shard_that_changed_size_is_dropped_not_misread(copied, shard_digests, caplog):
    states, before = interrupted_states(copied, 1, 0, batches=3)
    changed = copied[2]
    changed.write_bytes(copied[1].read_bytes() + bytes(10240))  # same name, other content and size
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        after, _ = resumed_pass(copied, states, 1, 0)
    assert "gone or changed size" in caplog.text and str(changed) in caplog.text
    assert max(Counter(before + after).values()) == 1


def test_an_old_format_state_starts_the_next_pass_for_local_shards(shards, caplog):
    interrupted = digest_loader(shards)
    take(interrupted, 2)
    state = interrupted.state_dict()
    state = {key: value for key, value in state.items() if key not in ("stream", "layout", "shards")}
    state["version"] = 2  # as saved before: a datasets position per worker
    loader = digest_loader(shards)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        loader.load_state_dict(state)
    assert loader.epoch == 1 and "an older simmim_hf" in caplog.text


def test_a_broken_shard_resumes_exactly_and_is_counted_once(copied):
    data = copied[1].read_bytes()
    copied[1].write_bytes(data[: len(data) // 2])  # cut in the middle of a member: the rest of that file is lost

    def loader() -> StreamLoader:
        return digest_loader(copied)

    reference = loader()
    expected = passes(reference, 1)[0]
    assert reference.fault_counts()["broken_file"] == 1 and 128 < len(expected) < NUM_IMAGES
    for k in (2, len(expected) // BATCH - 1):
        interrupted = loader()
        before = [d for batch in take(interrupted, k) for d in batch["digests"]]
        resumed = loader()
        resumed.load_state_dict(interrupted.state_dict())
        assert before + rest_of_pass(resumed) == expected
        assert resumed.fault_counts()["broken_file"] == 1


def test_too_few_shards_for_the_ranks_is_a_usage_error(shards):
    from simmim_hf.errors import UsageError

    with pytest.raises(UsageError, match="--data_files: 1 shard file"):
        load_pretrain_dataset(data_args(shards[:1], 4), world_size=2, transform=IDENTITY)


# --- datasets' own streams (Hub, save_to_disk, the embedded corpus): the buffer is skipped, as before ----------


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory, fashion_mnist_dir) -> Path:
    """64 Fashion-MNIST images as a `save_to_disk` folder (streamed by `datasets`, in 48 shards)."""
    from simmim_hf.data.sources import fashion_mnist_subset

    folder = tmp_path_factory.mktemp("saved") / "fmnist"
    fashion_mnist_subset("test", 64).save_to_disk(str(folder))
    return folder


def datasets_loader(folder: Path, num_workers: int, buffer: int = 8) -> StreamLoader:
    args = DataArguments(dataset_name=str(folder), shuffle_buffer_size=buffer)
    dataset = load_pretrain_dataset(args, seed=SEED, num_workers=num_workers, transform=IDENTITY)
    return StreamLoader(dataset, DigestCollator(), batch_size=4, num_workers=num_workers)


@pytest.mark.parametrize(("num_workers", "version"), [(0, 3), (2, 3), (0, 2)])
def test_datasets_streams_skip_what_their_buffer_held_and_say_so(saved_dataset, num_workers, version, caplog):
    loader = datasets_loader(saved_dataset, num_workers)
    seen = [d for batch in take(loader, 5) for d in batch["digests"]]
    state = loader.state_dict()
    state["version"] = version  # a version-2 state (older simmim_hf) loads the same way
    resumed_loader = datasets_loader(saved_dataset, num_workers)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        resumed_loader.load_state_dict(state)
    resumed = rest_of_pass(resumed_loader)
    skipped = resumed_loader.skipped_at_resume
    assert set(resumed).isdisjoint(seen) and len(set(resumed)) == len(resumed)
    assert 0 < skipped <= 8 * max(1, num_workers)
    assert 64 - len(seen) - len(resumed) - skipped < 4 * max(1, num_workers)
    assert f"{skipped} image(s) that sat in the shuffle buffer(s)" in caplog.text


def test_parquet_shards_resume_exactly(tmp_path, fashion_mnist_dir):
    prepare_data(
        PrepareDataArguments(
            source="fashion-mnist", output=str(tmp_path), num_shards=4, max_samples=64, split="test", format="parquet"
        )
    )
    args = DataArguments(dataset_name="parquet", data_files=[str(tmp_path / "*.parquet")], shuffle_buffer_size=8)

    def loader() -> StreamLoader:
        dataset = load_pretrain_dataset(args, seed=SEED, rank=1, world_size=2, num_workers=2, config=CONFIG)
        return StreamLoader(dataset, SimMIMCollator(SimMIMMaskGenerator(16, 4, 2, 0.5), SEED, 1), 4, 2)

    reference = take(loader(), 10)  # 32 images a pass: 8 batches
    interrupted = loader()
    take(interrupted, 3)
    resumed = loader()
    resumed.load_state_dict(interrupted.state_dict())
    for batch, expected in zip(take(resumed, 7), reference[3:]):
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(batch["bool_masked_pos"], expected["bool_masked_pos"])


def test_a_stop_signal_sent_to_every_process_leaves_the_dataloader_workers_running(shards):
    """SLURM at its time limit and Ctrl-C in a terminal signal every process of the job: the workers must ignore it,
    so that the training process alone stops (agree, checkpoint, exit) instead of dying of a killed worker."""
    import multiprocessing
    import subprocess
    import time

    loader = simmim_loader(shards, 0, 1, 1)
    batches = iter(loader)
    next(batches)
    workers = multiprocessing.active_children()  # the DataLoader's worker process
    assert len(workers) == 1 and workers[0].is_alive()
    for name in ("TERM", "INT", "USR1"):  # sent by another process, as a scheduler or a terminal does
        subprocess.run(["kill", f"-{name}", str(workers[0].pid)], check=True)
    time.sleep(0.5)
    assert workers[0].is_alive()
    assert len([next(batches) for _ in range(4)]) == 4  # the stream goes on
    from simmim_hf.data.stream import _parent_exiting

    _parent_exiting().set()  # what this process does at exit, before multiprocessing terminates its workers
    try:
        workers[0].terminate()  # then the parent's SIGTERM ends the worker at once
        workers[0].join(timeout=10)
        assert not workers[0].is_alive()
    finally:
        _parent_exiting().clear()
