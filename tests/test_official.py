"""Official microsoft/SimMIM checkpoints in (from_official, official_classifier, scripts/convert_official.py).

Each test writes a checkpoint in the official key layout and `torch.save` format (random values, a yacs-like config
node in the pickle) and compares the converted model with a direct re-implementation of the official forward in
plain torch ops below (patch embed -> mask token blend -> blocks -> norm -> 1x1 conv -> PixelShuffle -> masked L1).
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from simmim_hf import SimMIMForMaskedImageModeling, from_official, official_classifier
from simmim_hf.publish.official import OfficialCheckpointError, OfficialConfigNode, load_official_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# Tiny official models. ViT: 32 px, 4 px patches (8x8 grid), width 32, 2 blocks, 4 heads. Swin: 32 px, 2 px patches,
# window 4, stages of 2 and 2 blocks with 2 and 4 heads (16x16 then 8x8 tokens), width 16 then 32.
VIT = dict(image=32, patch=4, width=32, depth=2, heads=4, mlp=64)
SWIN = dict(image=32, patch=2, width=16, depths=[2, 2], heads=[2, 4], window=4, mlp_ratio=4)
MASK_CELL = 8


# ------------------------------------------------------------------------------------------ official-format files


class _FakeYacs:
    """Installs a module `yacs.config` with a `CfgNode` (a dict subclass with instance attributes, like yacs') so
    the pickle references `yacs.config.CfgNode`; removed again before loading."""

    def __enter__(self):
        class CfgNode(dict):
            def __init__(self, init_dict=None, new_allowed=False):
                super().__init__(init_dict or {})
                self.__dict__["__immutable__"] = False
                self.__dict__["__new_allowed__"] = new_allowed

        CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
        package, module = types.ModuleType("yacs"), types.ModuleType("yacs.config")
        module.CfgNode, package.config = CfgNode, module
        sys.modules["yacs"], sys.modules["yacs.config"] = package, module
        return CfgNode

    def __exit__(self, *exc):
        sys.modules.pop("yacs.config", None)
        sys.modules.pop("yacs", None)


def save_official(path, state, model_type, image_size, heads=None, extra=None):
    with _FakeYacs() as CfgNode:
        section = CfgNode({"NUM_HEADS": heads}) if heads is not None else CfgNode({})
        config = CfgNode(
            {
                "MODEL": CfgNode({"TYPE": model_type, "DROP_PATH_RATE": 0.0, model_type.upper(): section}),
                "DATA": CfgNode({"IMG_SIZE": image_size, "MASK_PATCH_SIZE": MASK_CELL, "MASK_RATIO": 0.6}),
                "TRAIN": CfgNode({"BASE_LR": 1e-4, "EPOCHS": 800}),
            }
        )
        first = next(iter(state.values()))
        checkpoint = {
            "model": state,
            "optimizer": {"state": {0: {"exp_avg": torch.zeros_like(first)}}, "param_groups": [{"lr": 1e-4}]},
            "lr_scheduler": {"base_lrs": [1e-4], "last_epoch": 3},
            "max_accuracy": 0.0,
            "epoch": 3,
            "config": config,
            **(extra or {}),
        }
        torch.save(checkpoint, path)
    return path


def vit_relative_index(grid):
    """BEiT's relative position index of a grid x grid window plus a CLS token."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += grid - 1
    relative[:, :, 1] += grid - 1
    relative[:, :, 0] *= 2 * grid - 1
    distances = (2 * grid - 1) ** 2 + 3
    index = torch.zeros((grid * grid + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = distances - 3
    index[0:, 0] = distances - 2
    index[0, 0] = distances - 1
    return index


def swin_relative_index(window):
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    return relative.sum(-1)


def window_partition(x, window):
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels)


def window_reverse(windows, window, height, width):
    batch = windows.shape[0] // ((height // window) * (width // window))
    x = windows.view(batch, height // window, width // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def swin_attn_mask(resolution, window, shift):
    image_mask = torch.zeros(1, resolution, resolution, 1)
    count = 0
    for h in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for w in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            image_mask[:, h, w, :] = count
            count += 1
    windows = window_partition(image_mask, window).view(-1, window * window)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def rand(*shape, scale=0.2):
    return torch.randn(*shape) * scale


def vit_state(prefix="encoder.", finetuned=False, num_classes=5, seed=0):
    """Random weights in the official BEiT-style ViT layout (pretraining: shared table, CLS pooling; fine-tuned:
    per-block tables, mean pooling with fc_norm, head)."""
    torch.manual_seed(seed)
    width, grid, heads = VIT["width"], VIT["image"] // VIT["patch"], VIT["heads"]
    rows = (2 * grid - 1) ** 2 + 3
    state = {
        f"{prefix}patch_embed.proj.weight": rand(width, 3, VIT["patch"], VIT["patch"]),
        f"{prefix}patch_embed.proj.bias": rand(width),
        f"{prefix}cls_token": rand(1, 1, width),
    }
    if not finetuned:
        state[f"{prefix}mask_token"] = rand(1, 1, width)
        state[f"{prefix}rel_pos_bias.relative_position_bias_table"] = rand(rows, heads, scale=1.0)
        state[f"{prefix}rel_pos_bias.relative_position_index"] = vit_relative_index(grid)
    for i in range(VIT["depth"]):
        b = f"{prefix}blocks.{i}."
        state.update(
            {
                b + "gamma_1": rand(width, scale=0.5),
                b + "gamma_2": rand(width, scale=0.5),
                b + "norm1.weight": 1 + rand(width),
                b + "norm1.bias": rand(width),
                b + "attn.q_bias": rand(width),
                b + "attn.v_bias": rand(width),
                b + "attn.qkv.weight": rand(3 * width, width),
                b + "attn.proj.weight": rand(width, width),
                b + "attn.proj.bias": rand(width),
                b + "norm2.weight": 1 + rand(width),
                b + "norm2.bias": rand(width),
                b + "mlp.fc1.weight": rand(VIT["mlp"], width),
                b + "mlp.fc1.bias": rand(VIT["mlp"]),
                b + "mlp.fc2.weight": rand(width, VIT["mlp"]),
                b + "mlp.fc2.bias": rand(width),
            }
        )
        if finetuned:
            state[b + "attn.relative_position_bias_table"] = rand(rows, heads, scale=1.0)
            state[b + "attn.relative_position_index"] = vit_relative_index(grid)
    if finetuned:
        state.update({"fc_norm.weight": 1 + rand(width), "fc_norm.bias": rand(width)})
        state.update({"head.weight": rand(num_classes, width), "head.bias": rand(num_classes)})
    else:
        state.update({f"{prefix}norm.weight": 1 + rand(width), f"{prefix}norm.bias": rand(width)})
        stride = VIT["patch"]
        state.update({"decoder.0.weight": rand(stride**2 * 3, width, 1, 1), "decoder.0.bias": rand(stride**2 * 3)})
    return state


def swin_state(prefix="encoder.", finetuned=False, num_classes=5, seed=0):
    torch.manual_seed(seed)
    patch, window = SWIN["patch"], SWIN["window"]
    width = SWIN["width"]
    state = {
        f"{prefix}patch_embed.proj.weight": rand(width, 3, patch, patch),
        f"{prefix}patch_embed.proj.bias": rand(width),
        f"{prefix}patch_embed.norm.weight": 1 + rand(width),
        f"{prefix}patch_embed.norm.bias": rand(width),
    }
    if not finetuned:
        state[f"{prefix}mask_token"] = rand(1, 1, width)
    resolution = SWIN["image"] // patch
    for stage, (depth, heads) in enumerate(zip(SWIN["depths"], SWIN["heads"])):
        dim = width * 2**stage
        hidden = dim * SWIN["mlp_ratio"]
        for block in range(depth):
            b = f"{prefix}layers.{stage}.blocks.{block}."
            state.update(
                {
                    b + "norm1.weight": 1 + rand(dim),
                    b + "norm1.bias": rand(dim),
                    b + "attn.relative_position_bias_table": rand((2 * window - 1) ** 2, heads, scale=1.0),
                    b + "attn.relative_position_index": swin_relative_index(window),
                    b + "attn.qkv.weight": rand(3 * dim, dim),
                    b + "attn.qkv.bias": rand(3 * dim),
                    b + "attn.proj.weight": rand(dim, dim),
                    b + "attn.proj.bias": rand(dim),
                    b + "norm2.weight": 1 + rand(dim),
                    b + "norm2.bias": rand(dim),
                    b + "mlp.fc1.weight": rand(hidden, dim),
                    b + "mlp.fc1.bias": rand(hidden),
                    b + "mlp.fc2.weight": rand(dim, hidden),
                    b + "mlp.fc2.bias": rand(dim),
                }
            )
            if block % 2 == 1 and resolution > window:
                state[b + "attn_mask"] = swin_attn_mask(resolution, window, window // 2)
        if stage < len(SWIN["depths"]) - 1:
            d = f"{prefix}layers.{stage}.downsample."
            state.update(
                {
                    d + "reduction.weight": rand(2 * dim, 4 * dim),
                    d + "norm.weight": 1 + rand(4 * dim),
                    d + "norm.bias": rand(4 * dim),
                }
            )
            resolution //= 2
    final = width * 2 ** (len(SWIN["depths"]) - 1)
    state.update({f"{prefix}norm.weight": 1 + rand(final), f"{prefix}norm.bias": rand(final)})
    if finetuned:
        state.update({"head.weight": rand(num_classes, final), "head.bias": rand(num_classes)})
    else:
        stride = patch * 2 ** (len(SWIN["depths"]) - 1)
        state.update({"decoder.0.weight": rand(stride**2 * 3, final, 1, 1), "decoder.0.bias": rand(stride**2 * 3)})
    return state


# --------------------------------------------------------------------------------- the official forward, in torch


def official_vit_tokens(state, pixel_values, mask, prefix="encoder.", finetuned=False):
    """mask: (N, grid, grid) with 1 = masked, or None. Returns the tokens after the blocks (and final norm)."""
    p = lambda name: state[prefix + name]  # noqa: E731
    x = F.conv2d(pixel_values, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=VIT["patch"])
    x = x.flatten(2).transpose(1, 2)
    batch, length, width = x.shape
    if mask is not None:
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + p("mask_token").expand(batch, length, -1) * w
    x = torch.cat([p("cls_token").expand(batch, -1, -1), x], dim=1)
    heads = VIT["heads"]

    def rel_bias(table, index):
        n = index.shape[0]
        return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    shared = None if finetuned else rel_bias(p("rel_pos_bias.relative_position_bias_table"),
                                             p("rel_pos_bias.relative_position_index"))  # fmt: skip
    for i in range(VIT["depth"]):
        b = lambda name, i=i: p(f"blocks.{i}.{name}")  # noqa: E731
        bias = shared if not finetuned else rel_bias(b("attn.relative_position_bias_table"),
                                                     b("attn.relative_position_index"))  # fmt: skip
        h = F.layer_norm(x, (width,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        qkv_bias = torch.cat([b("attn.q_bias"), torch.zeros_like(b("attn.v_bias")), b("attn.v_bias")])
        qkv = F.linear(h, b("attn.qkv.weight"), qkv_bias).reshape(batch, -1, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1) + bias.unsqueeze(0)
        h = (attn.softmax(-1) @ v).transpose(1, 2).reshape(batch, -1, width)
        h = F.linear(h, b("attn.proj.weight"), b("attn.proj.bias"))
        x = x + b("gamma_1") * h
        h = F.layer_norm(x, (width,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"),
                     b("mlp.fc2.bias"))  # fmt: skip
        x = x + b("gamma_2") * h
    if finetuned:
        return x
    return F.layer_norm(x, (width,), p("norm.weight"), p("norm.bias"), eps=1e-6)


def official_swin_tokens(state, pixel_values, mask, prefix="encoder."):
    p = lambda name: state[prefix + name]  # noqa: E731
    patch, window = SWIN["patch"], SWIN["window"]
    x = F.conv2d(pixel_values, p("patch_embed.proj.weight"), p("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (x.shape[-1],), p("patch_embed.norm.weight"), p("patch_embed.norm.bias"))
    batch, length, _ = x.shape
    if mask is not None:
        w = mask.flatten(1).unsqueeze(-1).type_as(x)
        x = x * (1 - w) + p("mask_token").expand(batch, length, -1) * w
    resolution = SWIN["image"] // patch
    for stage, (depth, heads) in enumerate(zip(SWIN["depths"], SWIN["heads"])):
        dim = x.shape[-1]
        for block in range(depth):
            b = lambda name, s=stage, k=block: p(f"layers.{s}.blocks.{k}.{name}")  # noqa: E731
            shift = window // 2 if (block % 2 == 1 and resolution > window) else 0
            shortcut = x
            h = F.layer_norm(x, (dim,), b("norm1.weight"), b("norm1.bias")).view(batch, resolution, resolution, dim)
            if shift:
                h = torch.roll(h, shifts=(-shift, -shift), dims=(1, 2))
            windows = window_partition(h, window).view(-1, window * window, dim)
            n = window * window
            qkv = F.linear(windows, b("attn.qkv.weight"), b("attn.qkv.bias")).reshape(-1, n, 3, heads, dim // heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
            bias = b("attn.relative_position_bias_table")[b("attn.relative_position_index").view(-1)]
            attn = attn + bias.view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
            if shift:
                attn_mask = b("attn_mask")
                num_windows = attn_mask.shape[0]
                attn = attn.view(-1, num_windows, heads, n, n) + attn_mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, heads, n, n)
            h = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, dim)
            h = F.linear(h, b("attn.proj.weight"), b("attn.proj.bias"))
            h = window_reverse(h.view(-1, window, window, dim), window, resolution, resolution)
            if shift:
                h = torch.roll(h, shifts=(shift, shift), dims=(1, 2))
            x = shortcut + h.reshape(batch, -1, dim)
            h = F.layer_norm(x, (dim,), b("norm2.weight"), b("norm2.bias"))
            h = F.linear(F.gelu(F.linear(h, b("mlp.fc1.weight"), b("mlp.fc1.bias"))), b("mlp.fc2.weight"),
                         b("mlp.fc2.bias"))  # fmt: skip
            x = x + h
        if stage < len(SWIN["depths"]) - 1:
            d = lambda name, s=stage: p(f"layers.{s}.downsample.{name}")  # noqa: E731
            g = x.view(batch, resolution, resolution, dim)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
            g = g.view(batch, -1, 4 * dim)
            g = F.layer_norm(g, (4 * dim,), d("norm.weight"), d("norm.bias"))
            x = F.linear(g, d("reduction.weight"))
            resolution //= 2
    return F.layer_norm(x, (x.shape[-1],), p("norm.weight"), p("norm.bias"))


def official_simmim(state, pixel_values, mask, family):
    """(loss, reconstruction) of the official SimMIM: mask (N, grid, grid) at the encoder's patch size."""
    if family == "vit":
        tokens, patch, stride = official_vit_tokens(state, pixel_values, mask)[:, 1:], VIT["patch"], VIT["patch"]
    else:
        tokens, patch = official_swin_tokens(state, pixel_values, mask), SWIN["patch"]
        stride = patch * 2 ** (len(SWIN["depths"]) - 1)
    batch, length, channels = tokens.shape
    side = int(length**0.5)
    feature = tokens.transpose(1, 2).reshape(batch, channels, side, side)
    reconstruction = F.pixel_shuffle(F.conv2d(feature, state["decoder.0.weight"], state["decoder.0.bias"]), stride)
    pixel_mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(pixel_values, reconstruction, reduction="none")
    loss = (loss_recon * pixel_mask).sum() / (pixel_mask.sum() + 1e-5) / 3
    return loss, reconstruction


def make_batch(patch, seed=1):
    """Two real photos (skimage) at 32 px, ImageNet-normalised, and a random 60 % mask of 8 px cells."""
    from skimage import data

    images = []
    for photo in (data.astronaut(), data.chelsea()):
        image = torch.from_numpy(photo).permute(2, 0, 1).float().unsqueeze(0) / 255
        images.append(F.interpolate(image, size=(32, 32), mode="bilinear", antialias=True))
    pixel_values = torch.cat(images)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    pixel_values = (pixel_values - mean[:, None, None]) / std[:, None, None]
    generator = torch.Generator().manual_seed(seed)
    cells = 32 // MASK_CELL
    scores = torch.rand(2, cells * cells, generator=generator)
    cell_mask = torch.zeros(2, cells * cells)
    cell_mask.scatter_(1, scores.argsort(1)[:, : round(0.6 * cells * cells)], 1.0)
    scale = MASK_CELL // patch
    mask = cell_mask.view(2, cells, cells).repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    return pixel_values, mask.long()


# ------------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_converted_pretraining_checkpoint_reproduces_official_forward(tmp_path, family):
    state = vit_state() if family == "vit" else swin_state()
    image, heads = (VIT["image"], VIT["heads"]) if family == "vit" else (SWIN["image"], SWIN["heads"])
    path = save_official(tmp_path / "ckpt.pth", state, family, image, heads=heads)
    assert "yacs" not in sys.modules
    model = from_official(path).eval()
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules  # never imported
    config = model.config
    assert (config.mask_patch_size, config.mask_ratio) == (MASK_CELL, 0.6)
    if family == "vit":
        enc = config.encoder_config
        assert (enc.hidden_size, enc.num_hidden_layers, enc.num_attention_heads, enc.patch_size) == (32, 2, 4, 4)
        assert enc.use_shared_relative_position_bias and not enc.use_relative_position_bias
        assert enc.layer_norm_eps == 1e-6 and not enc.use_mean_pooling
    else:
        enc = config.encoder_config
        assert (enc.embed_dim, enc.depths, enc.num_heads, enc.window_size) == (16, [2, 2], [2, 4], 4)
        assert enc.image_size == 32 and enc.patch_size == 2
    pixel_values, mask = make_batch(VIT["patch"] if family == "vit" else SWIN["patch"])
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask.flatten(1))
        loss, reconstruction = official_simmim(state, pixel_values, mask, family)
    assert loss.item() > 0.1
    assert torch.allclose(output.loss, loss, atol=1e-5, rtol=0), (output.loss, loss)
    assert torch.allclose(output.reconstruction, reconstruction, atol=1e-5, rtol=0)
    assert (output.reconstruction - reconstruction).abs().max() < 1e-5


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_converted_finetuned_checkpoint_is_a_stock_classifier(tmp_path, family):
    state = vit_state(prefix="", finetuned=True) if family == "vit" else swin_state(prefix="", finetuned=True)
    image = VIT["image"] if family == "vit" else SWIN["image"]
    path = save_official(tmp_path / "ckpt.pth", state, family, image)
    model = official_classifier(path).eval()
    assert type(model).__name__ == ("BeitForImageClassification" if family == "vit" else "SwinForImageClassification")
    pixel_values, _ = make_batch(VIT["patch"] if family == "vit" else SWIN["patch"])
    with torch.no_grad():
        logits = model(pixel_values).logits
        if family == "vit":
            tokens = official_vit_tokens(state, pixel_values, None, prefix="", finetuned=True)
            pooled = F.layer_norm(tokens[:, 1:].mean(1), (VIT["width"],), state["fc_norm.weight"],
                                  state["fc_norm.bias"], eps=1e-6)  # fmt: skip
        else:
            pooled = official_swin_tokens(state, pixel_values, None, prefix="").mean(1)
        reference = F.linear(pooled, state["head.weight"], state["head.bias"])
    assert torch.allclose(logits, reference, atol=1e-5, rtol=0)


def test_script_converts_and_the_converted_checkpoint_trains_a_step(tmp_path):
    from transformers import AutoModel

    from simmim_hf.pretrain.arguments import SimMIMTrainingArguments
    from simmim_hf.pretrain.trainer import SimMIMTrainer

    state = vit_state()
    path = save_official(tmp_path / "ckpt.pth", state, "vit", VIT["image"], heads=VIT["heads"])
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "scripts/convert_official.py", str(path), "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "encoder" / "config.json").is_file()
    assert (out / "official_config.json").is_file()
    encoder, info = AutoModel.from_pretrained(out / "encoder", output_loading_info=True)
    assert type(encoder).__name__ == "BeitModel" and not any(info.values())

    model = SimMIMForMaskedImageModeling.from_pretrained(out)
    pixel_values, mask = make_batch(VIT["patch"])
    with torch.no_grad():
        assert torch.allclose(model.eval()(pixel_values, bool_masked_pos=mask.flatten(1)).loss,
                              official_simmim(state, pixel_values, mask, "vit")[0], atol=1e-5)  # fmt: skip
    rows = [{"pixel_values": pixel_values[i], "bool_masked_pos": mask[i].flatten()} for i in range(2)]
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
        warmup_steps=0, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1,
    )  # fmt: skip
    before = model.simmim.encoder.embeddings.patch_embeddings.projection.weight.detach().clone()
    trainer = SimMIMTrainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss)) and result.training_loss > 0
    after = model.simmim.encoder.embeddings.patch_embeddings.projection.weight.detach()
    assert not torch.equal(before, after)


def test_script_input_mistakes_exit_2_and_write_nothing(tmp_path):
    state = vit_state()
    del state["encoder.norm.weight"]
    path = save_official(tmp_path / "ckpt.pth", state, "vit", VIT["image"])
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "scripts/convert_official.py", str(path), "--output_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert result.returncode == 2 and "layernorm.weight" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CustomObject:
    pass


@pytest.mark.parametrize("payload", ["os.system", "custom class"])
def test_checkpoint_with_a_foreign_global_is_refused(tmp_path, payload):
    marker = tmp_path / "executed"
    extra = {"evil": _RunsACommand(marker) if payload == "os.system" else CustomObject()}
    path = save_official(tmp_path / "ckpt.pth", vit_state(), "vit", VIT["image"], extra=extra)
    with pytest.raises(OfficialCheckpointError) as error:
        from_official(path)
    expected = f"{os.system.__module__}.system" if payload == "os.system" else f"{__name__}.CustomObject"
    assert expected in str(error.value) and "refusing" in str(error.value)
    assert not marker.exists()


def test_config_node_is_read_as_plain_data(tmp_path):
    path = save_official(tmp_path / "ckpt.pth", vit_state(), "vit", VIT["image"], heads=4)
    checkpoint = load_official_checkpoint(path)
    config = checkpoint["config"]
    assert type(config) is OfficialConfigNode and config.MODEL.VIT.NUM_HEADS == 4
    assert config["DATA"]["IMG_SIZE"] == 32 and "yacs" not in sys.modules


def test_architecture_errors_name_the_tensor(tmp_path):
    state = vit_state()
    with pytest.raises(OfficialCheckpointError, match="encoder.rel_pos_bias.relative_position_bias_table"):
        from_official(state, num_attention_heads=2)  # the table has 4 heads
    swin = swin_state()
    with pytest.raises(OfficialCheckpointError, match="attn_mask"):
        from_official(swin, image_size=64)  # the shifted-window masks say 32
    swin["encoder.layers.1.blocks.0.attn.qkv.weight"] = swin["encoder.layers.1.blocks.0.attn.qkv.weight"][:, :16]
    with pytest.raises(OfficialCheckpointError, match=r"encoder\.layers\.1\.blocks\.0\.attn\.qkv\.weight"):
        from_official(swin)


def test_vit_heads_come_from_the_config_when_no_table_holds_them(tmp_path):
    state = vit_state()
    # Without relative position tables the heads are undetermined by shapes: the checkpoint config gives them.
    state = {k: v for k, v in state.items() if "rel_pos_bias" not in k}
    state["encoder.pos_embed"] = rand(1, 65, VIT["width"])
    path = save_official(tmp_path / "ckpt.pth", state, "vit", VIT["image"], heads=8)
    model = from_official(path)
    assert model.config.encoder_config.num_attention_heads == 8
    assert model.config.encoder_config.use_absolute_position_embeddings
    assert not model.config.encoder_config.use_shared_relative_position_bias


def test_overrides_go_through_the_config_override_path(tmp_path):
    """Conversion applies overrides as every other start does (`SimMIMConfig.from_preset`): Swin's derived
    `hidden_size` and an unknown field are refused naming the field; a real field (drop_path_rate) is applied."""
    swin = swin_state()
    with pytest.raises(ValueError, match=r"^hidden_size: the swin encoder config derives it"):
        from_official(swin, hidden_size=999)
    with pytest.raises(ValueError, match=r"^not_a_field: not a field"):
        from_official(swin, not_a_field=1)
    model = from_official(swin, drop_path_rate=0.2, mask_ratio=0.5)
    assert model.config.encoder_config.drop_path_rate == 0.2 and model.config.mask_ratio == 0.5
    assert model.config.encoder_config.embed_dim == SWIN["width"]  # still from the tensors
