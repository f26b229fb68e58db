"""The pretraining data pipeline: transforms, column detection, streaming, sharding by rank, resume, collation."""

import hashlib
import io
import itertools
import logging
import tarfile
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms import v2

from simmim_hf.data.collate import SimMIMCollator
from simmim_hf.data.images import build_pretrain_transform
from simmim_hf.data.sources import detect_image_column
from simmim_hf.data.stream import DataArguments, StreamLoader, interleaved_shards, load_pretrain_dataset
from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data
from simmim_hf.masking import SimMIMMaskGenerator

NUM_IMAGES, NUM_SHARDS = 64, 4
# Keeps the pixels as they are, so examples can be recognised after the pipeline (the real augmentation is random).
IDENTITY = v2.Compose([v2.PILToTensor()])


def digest(pixels: torch.Tensor) -> str:
    return hashlib.sha1(pixels.contiguous().numpy().tobytes()).hexdigest()


def rgb_config(**overrides):
    values = dict(image_size=32, num_channels=3, image_mean=[0.286] * 3, image_std=[0.353] * 3)
    values.update(overrides)
    return SimpleNamespace(**values)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, fashion_mnist_dir) -> Path:
    """64 Fashion-MNIST test images in 4 WebDataset tar shards."""
    output = tmp_path_factory.mktemp("shards")
    prepare_data(
        PrepareDataArguments(
            source="fashion-mnist", output=str(output), num_shards=NUM_SHARDS, max_samples=NUM_IMAGES, split="test"
        )
    )
    return output


@pytest.fixture(scope="module")
def source_digests(fashion_mnist_dir) -> set[str]:
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return {digest(torch.from_numpy(image.copy()).unsqueeze(0)) for image in images[:NUM_IMAGES]}


def shard_args(shards: Path, **overrides) -> DataArguments:
    values = dict(dataset_name="webdataset", data_files=[str(shards / "test-*.tar")], shuffle_buffer_size=4)
    values.update(overrides)
    return DataArguments(**values)


def collect_digests(examples) -> list[str]:
    return [digest(example["pixel_values"]) for example in examples]


class DigestCollator:
    """collate_fn that keeps only which images a batch holds."""

    def __call__(self, examples):
        return {"digests": collect_digests(examples)}


# --- arguments ---------------------------------------------------------------------------------------------------


def test_data_arguments_parse_from_command_line_and_yaml(tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DataArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--dataset_name", "webdataset", "--data_files", "a-*.tar", "b.tar", "--streaming", "false"]
    )
    assert args.data_files == ["a-*.tar", "b.tar"] and args.streaming is False and args.image_column is None
    config = tmp_path / "data.yaml"
    config.write_text("dataset_name: parquet\ndata_files: shards/*.parquet\nmax_train_samples: 5\n")
    (args,) = parser.parse_yaml_file(str(config))
    assert args.data_files == ["shards/*.parquet"] and args.max_train_samples == 5
    with pytest.raises(ValueError, match="shuffle_buffer_size"):
        DataArguments(shuffle_buffer_size=0)


# --- transform ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("channels", [1, 3])
def test_transform_output_shape_and_dtype(mode, channels):
    import skimage.data

    photo = PIL.Image.fromarray(skimage.data.astronaut()).convert(mode)
    config = rgb_config(num_channels=channels, image_mean=[0.5] * channels, image_std=[0.25] * channels)
    pixels = build_pretrain_transform(config)(photo)
    assert type(pixels) is torch.Tensor
    assert pixels.shape == (channels, 32, 32) and pixels.dtype == torch.float32
    # Normalised with mean 0.5 / std 0.25: the [0, 1] range maps to [-2, 2], and a photo spans most of it.
    assert pixels.min() >= -2.0 - 1e-5 and pixels.max() <= 2.0 + 1e-5
    assert pixels.max() - pixels.min() > 1.0


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_transform_normalises_with_config_mean_and_std(mode):
    # A flat grey image stays flat under crop, resize and flip, so every output pixel is (v / 255 - mean) / std.
    # 204 is on the web palette that "P" conversion uses, so it survives quantisation.
    grey = PIL.Image.new("RGB", (40, 30), (204, 204, 204)).convert(mode)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    pixels = build_pretrain_transform(rgb_config(image_mean=mean, image_std=std))(grey)
    expected = (204 / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected, atol=1e-3, rtol=0)
    assert pixels.std(dim=(1, 2)).max() < 1e-3


def test_transform_crops_randomly_and_flips():
    import skimage.data

    photo = PIL.Image.fromarray(skimage.data.camera())
    transform = build_pretrain_transform(rgb_config(num_channels=1, image_mean=[0.5], image_std=[0.5]))
    torch.manual_seed(0)
    first, second = transform(photo), transform(photo)
    assert not torch.equal(first, second)


def test_transform_rejects_bad_config():
    with pytest.raises(ValueError, match="num_channels"):
        build_pretrain_transform(rgb_config(num_channels=2, image_mean=[0.5] * 2, image_std=[0.5] * 2))
    with pytest.raises(ValueError, match="image_mean"):
        build_pretrain_transform(rgb_config(image_mean=[0.5]))


# --- image column ------------------------------------------------------------------------------------------------


def test_detect_image_column_prefers_the_single_image_feature():
    features = datasets.Features({"photo": datasets.Image(), "img": datasets.Value("string")})
    assert detect_image_column(features) == "photo"


def test_detect_image_column_falls_back_to_names():
    features = datasets.Features({"jpg": datasets.Value("binary"), "cls": datasets.Value("int64")})
    assert detect_image_column(features) == "jpg"
    assert detect_image_column(["__key__", "png"]) == "png"


def test_detect_image_column_errors_list_the_columns():
    two = datasets.Features({"a": datasets.Image(), "b": datasets.Image()})
    with pytest.raises(ValueError, match=r"Several Image columns.*\['a', 'b'\]"):
        detect_image_column(two)
    with pytest.raises(ValueError, match=r"Several candidate.*\['image', 'jpg'\]"):
        detect_image_column(["image", "jpg"])
    with pytest.raises(ValueError, match=r"No image column.*\['text', 'label'\]"):
        detect_image_column(["text", "label"])
    with pytest.raises(ValueError, match="'photo' is not a column"):
        detect_image_column(["image"], image_column="photo")


# --- streaming dataset -------------------------------------------------------------------------------------------


def test_stream_yields_normalised_pixel_values(shards):
    dataset = load_pretrain_dataset(shard_args(shards), seed=0, config=rgb_config())
    examples = list(itertools.islice(dataset, 3))
    assert [list(example) for example in examples] == [["pixel_values"]] * 3
    assert all(example["pixel_values"].shape == (3, 32, 32) for example in examples)
    # Greyscale replicated to RGB.
    assert torch.equal(examples[0]["pixel_values"][0], examples[0]["pixel_values"][2])


def test_stream_reads_every_source_image_once(shards, source_digests):
    dataset = load_pretrain_dataset(shard_args(shards), seed=0, transform=IDENTITY)
    seen = collect_digests(dataset)
    assert len(seen) == NUM_IMAGES and set(seen) == source_digests


def test_split_by_node_gives_disjoint_ranks_covering_all(shards, source_digests):
    per_rank = [
        collect_digests(load_pretrain_dataset(shard_args(shards), seed=3, rank=rank, world_size=2, transform=IDENTITY))
        for rank in range(2)
    ]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert len(per_rank[0]) == len(per_rank[1]) == NUM_IMAGES // 2
    assert set(per_rank[0]) | set(per_rank[1]) == source_digests


def test_shard_count_warning(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        load_pretrain_dataset(shard_args(shards), world_size=2, num_workers=2, transform=IDENTITY)
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        load_pretrain_dataset(shard_args(shards), world_size=1, num_workers=3, transform=IDENTITY)
    assert "4 shard(s), not a multiple" in caplog.text and "imagefolder streams as ONE shard" in caplog.text


def test_max_train_samples_truncates_the_stream(shards):
    dataset = load_pretrain_dataset(shard_args(shards, max_train_samples=10), transform=IDENTITY)
    assert len(list(dataset)) == 10


def test_interleaved_shards_never_exceed_a_readers_share():
    assert interleaved_shards(4, world_size=1, num_workers=2) == 2
    assert interleaved_shards(64, world_size=2, num_workers=4) == 8
    assert interleaved_shards(1000) == 10
    assert interleaved_shards(3, world_size=2, num_workers=2) == 1


def corrupt_shard(folder: Path) -> Path:
    """One tar shard: 5 Fashion-MNIST PNGs and, in the middle, a PNG cut in half."""
    from simmim_hf.data.fashion_mnist import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    path = folder / "corrupt-00000.tar"
    with tarfile.open(path, "w") as tar:
        for index in range(6):
            buffer = io.BytesIO()
            PIL.Image.fromarray(images[index]).save(buffer, format="PNG")
            data = buffer.getvalue()
            if index == 3:
                data = data[: len(data) // 2]
            info = tarfile.TarInfo(f"{index:06d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_corrupt_image_is_skipped_and_counted(tmp_path, fashion_mnist_dir, caplog):
    path = corrupt_shard(tmp_path)
    args = DataArguments(dataset_name="webdataset", data_files=[str(path)], shuffle_buffer_size=2)
    dataset = load_pretrain_dataset(args, config=rgb_config())
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.images"):
        examples = list(dataset)
    assert len(examples) == 5
    assert dataset.simmim_decoder.num_skipped == 1
    assert "000003.png" in caplog.text


def test_embedded_fashion_mnist_streams_by_default(fashion_mnist_dir):
    args = DataArguments(train_split="test", max_train_samples=96)
    assert args.dataset_name == "fashion-mnist" and args.streaming
    dataset = load_pretrain_dataset(args, seed=0, world_size=2, rank=1, config=rgb_config())
    examples = list(dataset)
    assert len(examples) == 48 and examples[0]["pixel_values"].shape == (3, 32, 32)


def test_map_style_dataset_uses_with_transform(shards):
    args = DataArguments(dataset_name="fashion-mnist", train_split="test", streaming=False, max_train_samples=8)
    dataset = load_pretrain_dataset(args, config=rgb_config())
    assert isinstance(dataset, datasets.Dataset) and len(dataset) == 8
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    batch = SimMIMCollator(SimMIMMaskGenerator(32, 8, 4, 0.5))([dataset[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32)


# --- collator ----------------------------------------------------------------------------------------------------


def make_collator(seed=0, rank=0) -> SimMIMCollator:
    return SimMIMCollator(
        SimMIMMaskGenerator(input_size=32, mask_patch_size=8, model_patch_size=4, mask_ratio=0.6), seed, rank
    )


def fake_examples(count: int):
    return [{"pixel_values": torch.full((3, 32, 32), float(i))} for i in range(count)]


def test_collator_shapes_and_mask_counts():
    collator = make_collator()
    batch = collator(fake_examples(5))
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["bool_masked_pos"].shape == (5, 64) and batch["bool_masked_pos"].dtype == torch.bool
    generator = collator.mask_generator
    per_image = generator.num_masked_cells * generator.scale**2
    assert batch["bool_masked_pos"].sum(dim=1).tolist() == [per_image] * 5


def test_collator_masks_are_deterministic_and_differ_by_rank_and_step():
    run, rerun_collator = make_collator(seed=1), make_collator(seed=1)
    first = [run(fake_examples(4))["bool_masked_pos"] for _ in range(2)]
    rerun = [rerun_collator(fake_examples(4))["bool_masked_pos"] for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert not torch.equal(rerun[0], rerun[1])  # the next step draws new masks
    other_rank = make_collator(seed=1, rank=1)(fake_examples(4))["bool_masked_pos"]
    assert not torch.equal(first[0], other_rank)
    other_seed = make_collator(seed=2)(fake_examples(4))["bool_masked_pos"]
    assert not torch.equal(first[0], other_seed)


def test_collator_masks_differ_across_workers_and_repeat_on_rerun():
    def run() -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(fake_examples(8), batch_size=2, num_workers=2, collate_fn=make_collator())
        torch.manual_seed(0)  # worker seeds derive from the main process's RNG, as under `Trainer(seed=...)`
        return [batch["bool_masked_pos"] for batch in loader]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[1])  # batches 0 and 1 come from workers 0 and 1


def test_collator_drops_undecoded_examples():
    collator = make_collator()
    examples = fake_examples(4)
    examples[1] = None
    examples[2] = {"pixel_values": None}
    batch = collator(examples)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 3.0]
    assert batch["bool_masked_pos"].shape == (2, 64)
    assert collator.num_dropped == 2
    with pytest.raises(ValueError, match="failed to decode"):
        collator([None, None])


# --- endless, resumable loader -----------------------------------------------------------------------------------


def test_stream_loader_repeats_and_reshuffles_each_pass(shards, source_digests):
    dataset = load_pretrain_dataset(shard_args(shards), seed=0, transform=IDENTITY)
    loader = StreamLoader(dataset, DigestCollator(), batch_size=8)
    batches = iter(loader)
    passes = [[d for _ in range(NUM_IMAGES // 8) for d in next(batches)["digests"]] for _ in range(2)]
    assert loader.epoch == 1
    assert set(passes[0]) == set(passes[1]) == source_digests
    assert passes[0] != passes[1]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stream_loader_resume_continues_with_unseen_samples(shards, num_workers):
    def build() -> StreamLoader:
        dataset = load_pretrain_dataset(shard_args(shards), seed=0, num_workers=num_workers, transform=IDENTITY)
        return StreamLoader(dataset, DigestCollator(), batch_size=4, num_workers=num_workers)

    loader = build()
    batches = iter(loader)
    seen = [d for _ in range(5) for d in next(batches)["digests"]]
    state = loader.state_dict()
    del batches

    resumed_loader = build()
    resumed_loader.load_state_dict(state)
    resumed = []
    for batch in resumed_loader:
        if resumed_loader.epoch != state["epoch"]:
            break
        resumed.extend(batch["digests"])
    assert set(resumed).isdisjoint(seen)
    # Only what sat in the shuffle buffers (4 per reader) is lost; the first 20 images are not replayed.
    readers = max(1, num_workers)
    assert len(resumed) >= NUM_IMAGES - len(seen) - 4 * readers - 4


def test_stream_loader_state_with_other_worker_count_starts_next_pass(shards, caplog):
    dataset = load_pretrain_dataset(shard_args(shards), transform=IDENTITY)
    loader = StreamLoader(dataset, DigestCollator(), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="simmim_hf.data.stream"):
        loader.load_state_dict({"version": 1, "epoch": 2, "num_workers": 3, "worker_states": {}})
    assert loader.epoch == 3 and "older simmim_hf" in caplog.text and "starting pass 3" in caplog.text
    with pytest.raises(ValueError, match="num_workers"):
        StreamLoader(dataset, DigestCollator(), batch_size=4, num_workers=2)


# --- Trainer integration -----------------------------------------------------------------------------------------


class RecordingModel(torch.nn.Module):
    """Stands in for SimMIM: records which images each step saw."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[str] = []

    def forward(self, pixel_values, bool_masked_pos):
        self.seen.extend(digest(image) for image in pixel_values.to(torch.uint8))
        return {"loss": (self.weight - pixel_values.float().mean()).pow(2).sum()}


def train(tmp_path, dataset, max_steps, loader=None) -> RecordingModel:
    from transformers import Trainer, TrainingArguments

    class StreamTrainer(Trainer):
        def get_train_dataloader(self):
            return loader if loader is not None else super().get_train_dataloader()

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    model = RecordingModel()
    StreamTrainer(model=model, args=args, train_dataset=dataset, data_collator=make_collator()).train()
    return model


def test_trainer_reiterates_a_stream_and_reshuffles_each_epoch(tmp_path, shards, source_digests):
    # transformers' own path: the Trainer re-iterates an IterableDataset past its end and calls `set_epoch` on it.
    dataset = load_pretrain_dataset(shard_args(shards), seed=0, transform=IDENTITY)
    model = train(tmp_path, dataset, max_steps=2 * NUM_IMAGES // 8)
    first, second = model.seen[:NUM_IMAGES], model.seen[NUM_IMAGES:]
    assert set(first) == set(second) == source_digests
    assert first != second
    assert dataset.epoch == 1


def test_trainer_runs_on_stream_loader_across_passes(tmp_path, shards, source_digests):
    dataset = load_pretrain_dataset(shard_args(shards), seed=0, transform=IDENTITY)
    loader = StreamLoader(dataset, make_collator(), batch_size=8)
    model = train(tmp_path, dataset, max_steps=NUM_IMAGES // 8 + 2, loader=loader)
    assert len(model.seen) == NUM_IMAGES + 16
    assert set(model.seen[:NUM_IMAGES]) == source_digests
    assert loader.epoch == 1
    assert np.isfinite(model.weight.item())
