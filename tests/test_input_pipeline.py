"""The fast input path: SimMIMAugmentation against torchvision, uint8 pixels normalised on the device, reduced-size
JPEG decoding, and the job's trainer options (fused AdamW, torch.compile) on the CPU."""

import io
import random

import numpy as np
import PIL.Image
import pytest
import skimage.data
import torch
from tiny_configs import tiny_simmim_config
from torchvision.transforms.v2 import functional as F

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.data.images import (
    SimMIMAugmentation,
    build_pretrain_transform,
    normalize_pixel_values,
    random_resized_crop_box,
)
from simmim_hf.data.stream import DataArguments, load_pretrain_dataset

CONFIG = SimMIMConfig.from_preset("demo")


def torchvision_reference(image, box, flip, config):
    """torchvision v2's functional ops on the same box and flip: an independent implementation of the augmentation."""
    rgb = F.grayscale_to_rgb(image) if config.num_channels == 3 else F.rgb_to_grayscale(image)
    size = [config.image_size, config.image_size]
    out = F.resized_crop(rgb, *box, size=size, antialias=True)
    if flip:
        out = F.horizontal_flip(out)
    out = F.to_dtype(F.pil_to_tensor(out), torch.float32, scale=True)
    return F.normalize(out, config.image_mean, config.image_std)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_uint8_and_float_paths_equal_torchvision_on_the_same_draws(mode):
    photo = PIL.Image.fromarray(skimage.data.astronaut()).resize((120, 90)).convert(mode)
    as_float, as_uint8 = build_pretrain_transform(CONFIG), build_pretrain_transform(CONFIG, uint8=True)
    for seed in range(6):
        draws = random.Random(seed)
        box = random_resized_crop_box(photo.width, photo.height, draws)
        flip = draws.random() < 0.5
        reference = torchvision_reference(photo, box, flip, CONFIG)
        pixels = as_uint8(photo, random.Random(seed))
        assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
        device_normalised = normalize_pixel_values(pixels.unsqueeze(0), CONFIG.image_mean, CONFIG.image_std)[0]
        torch.testing.assert_close(device_normalised, reference, atol=1e-6, rtol=0)
        torch.testing.assert_close(as_float(photo, random.Random(seed)), reference, atol=1e-6, rtol=0)


def test_horizontal_flip_happens_half_the_time_and_mirrors_the_crop():
    """Over 400 seeds the flip rate is 1/2 (4-sigma band: 0.5 +- 4 * 0.025), and a flipped output is exactly the
    mirror (torch.flip on the width axis) of the same crop unflipped (torchvision's crop and resize of the same box,
    the first draws of the same `random.Random`; the flip is the next draw)."""
    photo = PIL.Image.fromarray(skimage.data.astronaut()).resize((120, 90))
    augment = build_pretrain_transform(CONFIG, uint8=True)

    flipped = 0
    for seed in range(400):
        draws = random.Random(seed)
        random_resized_crop_box(photo.width, photo.height, draws)
        flips = draws.random() < 0.5  # the draw the augmentation makes after the box
        pixels = augment(photo, random.Random(seed))
        box = random_resized_crop_box(photo.width, photo.height, random.Random(seed))
        unflipped = torchvision_reference(photo, box, False, CONFIG)
        mirror = torch.flip(unflipped, dims=[-1])
        as_float = normalize_pixel_values(pixels.unsqueeze(0), CONFIG.image_mean, CONFIG.image_std)[0]
        torch.testing.assert_close(as_float, mirror if flips else unflipped, atol=1e-6, rtol=0)
        if flips and not torch.equal(mirror, unflipped):
            assert not torch.allclose(as_float, unflipped, atol=1e-3)
        flipped += flips
    assert abs(flipped / 400 - 0.5) < 4 * 0.025


def test_crop_box_distribution_matches_torchvision_random_resized_crop():
    from torchvision.transforms import v2

    from simmim_hf.data.images import CROP_RATIO, CROP_SCALE

    draws, image = random.Random(0), torch.zeros(3, 300, 400)
    torch.manual_seed(0)
    ours = np.array([random_resized_crop_box(400, 300, draws) for _ in range(4000)], dtype=float)
    theirs = np.array(
        [v2.RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO)) for _ in range(4000)]
    )
    for boxes in (ours, theirs):
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 300).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 400).all()

    def summary(boxes):  # quartiles of area fraction, aspect ratio and the crop centre
        features = [boxes[:, 2] * boxes[:, 3] / 120000, boxes[:, 3] / boxes[:, 2], boxes[:, 1] + boxes[:, 3] / 2]
        return np.array([np.quantile(feature, [0.25, 0.5, 0.75]) / np.median(feature) for feature in features])

    np.testing.assert_allclose(summary(ours), summary(theirs), atol=0.02)


def jpeg_with_marker(width=1600, height=1200):
    """A real photo, resized, with a 40 px white square whose centre is at (0.6 w, 0.45 h); JPEG bytes."""
    array = np.asarray(PIL.Image.fromarray(skimage.data.coffee()).resize((width, height)), dtype=np.uint8).copy()
    array //= 4  # dim the photo so that the marker is the brightest thing in every crop
    cx, cy = int(0.6 * width), int(0.45 * height)
    array[cy - 20 : cy + 20, cx - 20 : cx + 20] = 255
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def marker_centroid(pixels):
    grey = pixels.float().mean(0)
    weights = (grey > 160).float() * grey
    ys, xs = torch.meshgrid(torch.arange(grey.shape[0]), torch.arange(grey.shape[1]), indexing="ij")
    return (float((weights * xs).sum() / weights.sum()), float((weights * ys).sum() / weights.sum()))


def test_reduced_size_jpeg_decoding_keeps_the_crop_geometry():
    config = SimMIMConfig.from_preset("demo", image_size=64, mask_patch_size=8)
    data = jpeg_with_marker()
    drafted = SimMIMAugmentation((64, 64), 3, config.image_mean, config.image_std, uint8=True)
    full = SimMIMAugmentation((64, 64), 3, config.image_mean, config.image_std, uint8=True, draft=False)
    # The draft really decodes at a reduced scale for such a crop (64 px out of >= 1040 px: 1/8).
    probe = PIL.Image.open(io.BytesIO(data))
    assert probe.draft("RGB", (1600 * 64 // 1040, 1200 * 64 // 1040)) is not None and probe.size[0] <= 400
    compared = 0
    for seed in range(12):
        a = drafted.decode_and_augment(data, rng=random.Random(seed))
        b = full.decode_and_augment(data, rng=random.Random(seed))
        if (b.float().mean(0) > 160).sum() < 4:
            continue  # the marker is outside this crop
        compared += 1
        (ax, ay), (bx, by) = marker_centroid(a), marker_centroid(b)
        assert abs(ax - bx) <= 1.0 and abs(ay - by) <= 1.0, (seed, (ax, ay), (bx, by))
        assert (a.float() - b.float()).abs().mean() < 8  # the same picture, up to the downscaling filter
    assert compared >= 6


def test_stream_uint8_pixels_normalise_to_the_float_stream(shards):
    args = DataArguments(
        dataset_name="webdataset", data_files=list(shards), max_train_samples=16, shuffle_buffer_size=1
    )
    floats = [example["pixel_values"] for example in load_pretrain_dataset(args, seed=3, config=CONFIG)]
    uint8s = [example["pixel_values"] for example in load_pretrain_dataset(args, seed=3, config=CONFIG, uint8=True)]
    assert len(floats) == len(uint8s) == 16 and uint8s[0].dtype == torch.uint8
    normalised = normalize_pixel_values(torch.stack(uint8s), CONFIG.image_mean, CONFIG.image_std)
    torch.testing.assert_close(normalised, torch.stack(floats), atol=1e-6, rtol=0)


@pytest.mark.parametrize("compile_model", [False, True])
def test_trainer_normalises_uint8_batches_with_fused_adamw_and_compile(tmp_path, compile_model):
    from simmim_hf.masking import SimMIMMaskGenerator
    from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
    from simmim_hf.pretrain.trainer import SimMIMTrainer

    config = tiny_simmim_config("vit")
    config.image_mean, config.image_std = [0.3] * 3, [0.2] * 3
    model = SimMIMForMaskedImageModeling(config)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    masks = SimMIMMaskGenerator.from_config(config)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)
    examples = [{"pixel_values": image, "bool_masked_pos": masks(1, generator=generator)[0]} for image in images]
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to="none", use_cpu=True,
        optim="adamw_torch_fused", torch_compile=compile_model, torch_compile_backend="aot_eager" if compile_model else None,
        save_strategy="no", dataloader_num_workers=0, warmup_steps=0, lr_scheduler_type="constant",
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    trainer = SimMIMTrainer(model=model, args=args, train_dataset=examples)
    trainer.train()
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    # Really the fused kernel (not just an AdamW), in every group, with the no-weight-decay set in the 0 group.
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert all(group["fused"] is True for group in optimizer.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert exempt == {n for n, p in model.named_parameters() if p.ndim == 1} | {
        "simmim.encoder.embeddings.cls_token", "simmim.encoder.embeddings.mask_token",
        "simmim.encoder.embeddings.position_embeddings",
    }  # fmt: skip
    assert seen and seen[0].dtype == torch.float32
    expected = normalize_pixel_values(torch.stack([e["pixel_values"] for e in examples]), [0.3] * 3, [0.2] * 3)
    torch.testing.assert_close(torch.sort(seen[0].flatten())[0], torch.sort(expected.flatten())[0], atol=1e-6, rtol=0)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_normalisation_statistics_are_built_once_and_the_values_follow_the_formula():
    from simmim_hf.data.images import channel_statistics

    pixels = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.125]
    channel_statistics.cache_clear()
    first = normalize_pixel_values(pixels, mean, std)
    second = normalize_pixel_values(pixels, mean, std)
    info = channel_statistics.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # the second step reuses the tensors
    expected = torch.stack([(pixels[:, c].double() / 255 - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(first.double(), expected, atol=1e-6) and torch.equal(first, second)
    cached_mean, _ = channel_statistics(tuple(mean), tuple(std), pixels.device)
    assert cached_mean.flatten().tolist() == pytest.approx(mean)  # not modified in place by the normalisation
