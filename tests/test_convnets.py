"""ConvNet encoders (ConvNeXt, ConvNeXt V2, ResNet): sparse masking, token mode, the decoders and losses, FLOPs,
config mistakes, export to stock classes, and a short pretraining run. References are written out here."""

import json

import pytest
import torch
from test_auto_and_remote import run_python
from tiny_configs import tiny_convnet_config, tiny_resnet, tiny_simmim_config
from transformers import AutoModel

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator, SimMIMModel
from simmim_hf.backbones import conv_forward_macs, flops_per_image, no_weight_decay_names
from simmim_hf.modeling_simmim import SimMIMConvDecoder, upsample_mask
from simmim_hf.sparse_masking import SparseBatchNorm2d

FAMILIES = ["convnext", "convnextv2", "resnet"]


def inputs(config, batch_size=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(batch_size, 3, 32, 32, generator=generator)
    mask = SimMIMMaskGenerator.from_config(config)(batch_size, generator=generator)
    patch = config.model_patch_size
    masked_pixels = upsample_mask(mask, (32 // patch, 32 // patch), patch)  # (N, 1, H, W), 1 = masked
    return pixel_values, mask, masked_pixels


def keep_at(masked_pixels, height):
    """Visible (1) / masked (0) at a feature map of side `height`, written out cell by cell."""
    factor = masked_pixels.shape[-1] // height
    return 1.0 - masked_pixels[:, :, ::factor, ::factor].float()


def stage_features(model, pixel_values, mask):
    output = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
    return [*output.hidden_states, output.last_hidden_state]


def resnet_with(**overrides):
    return SimMIMConfig(encoder_config=tiny_resnet(**overrides), mask_patch_size=8, decoder_hidden_size=16)


SPARSE_CASES = {
    **{family: (lambda family=family: tiny_convnet_config(family)) for family in FAMILIES},
    # GELU can be negative before the max-pool (a zero at a masked position would win there); basic blocks.
    "resnet-gelu-basic": lambda: resnet_with(hidden_act="gelu", layer_type="basic"),
}


@pytest.mark.parametrize("case", sorted(SPARSE_CASES))
def test_sparse_features_do_not_depend_on_masked_pixels(case):
    config = SPARSE_CASES[case]()
    assert config.conv_masking == "sparse" and config.decoder_type == "conv"
    model = SimMIMModel(config).train()  # batch statistics: BatchNorm's must come from visible positions too
    randomise_biases(model)
    pixel_values, mask, masked_pixels = inputs(config)
    noise = 10 * torch.randn(pixel_values.shape, generator=torch.Generator().manual_seed(5))
    perturbed = pixel_values + noise * masked_pixels
    first, second = stage_features(model, pixel_values, mask), stage_features(model, perturbed, mask)
    assert len(first) >= 4  # stem and every stage
    for index, (a, b) in enumerate(zip(first, second)):
        keep = keep_at(masked_pixels, a.shape[-1])
        assert (a - b).mul(keep).abs().max() <= 1e-6, index
        assert torch.equal(a * (1 - keep), torch.zeros_like(a)), index
        assert a.mul(keep).abs().sum() > 0, index
    # A dense (token-mode) encoder spreads visible features into the masked positions: the zero check can fail.
    dense = SimMIMModel(config.with_overrides(conv_masking="token", decoder_type="linear")).train()
    last = stage_features(dense, pixel_values, mask)[-1]
    assert last.mul(1 - keep_at(masked_pixels, last.shape[-1])).abs().sum() > 0


def randomise_biases(model):
    """Stock inits start biases, norms' shifts and GRN at zero, which would hide what masking does."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or ".grn." in name:
                param.copy_(torch.rand(param.shape, generator=generator) - 0.5)


def _capture(module, store, key, prepend=True):
    """Records a module's (input, output) of the next call, before any other hook changes them."""

    def pre(module, args):
        store[key + "_in"] = args[0].detach().clone()

    def post(module, args, output):
        store[key + "_out"] = output.detach().clone()

    return [module.register_forward_pre_hook(pre, prepend=prepend), module.register_forward_hook(post)]


def test_max_pool_takes_the_maximum_over_visible_positions():
    config = resnet_with(hidden_act="gelu")
    model = SimMIMModel(config).train()
    pixel_values, mask, masked_pixels = inputs(config)
    store = {}
    _capture(model.encoder.embedder.pooler, store, "pool")
    model(pixel_values, bool_masked_pos=mask)
    x, out = store["pool_in"], store["pool_out"]  # (N, C, 16, 16) -> (N, C, 8, 8)
    keep_in, keep_out = keep_at(masked_pixels, 16), keep_at(masked_pixels, 8)
    assert (x * keep_in).min() < 0  # negative visible values exist, so a zero would change the maximum
    expected = torch.zeros_like(out)
    for n in range(x.shape[0]):
        for i in range(8):
            for j in range(8):
                if keep_out[n, 0, i, j] == 0:
                    continue
                rows = [r for r in (2 * i - 1, 2 * i, 2 * i + 1) if 0 <= r < 16]
                cols = [c for c in (2 * j - 1, 2 * j, 2 * j + 1) if 0 <= c < 16]
                values = [x[n, :, r, c] for r in rows for c in cols if keep_in[n, 0, r, c] == 1]
                expected[n, :, i, j] = torch.stack(values).max(dim=0).values
    assert torch.equal(out, expected)


def test_batch_norm_statistics_come_from_visible_positions():
    config = tiny_convnet_config("resnet")
    model = SimMIMModel(config).train()
    bn = model.encoder.embedder.embedder.normalization
    assert isinstance(bn, SparseBatchNorm2d) and set(dict(bn.named_buffers())) == {
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    pixel_values, mask, masked_pixels = inputs(config)
    store = {}
    _capture(bn, store, "bn")
    model(pixel_values, bool_masked_pos=mask)
    x, out = store["bn_in"], store["bn_out"]  # (N, C, 16, 16)
    keep = keep_at(masked_pixels, 16)[:, 0].bool()  # (N, 16, 16)
    for c in range(x.shape[1]):
        visible = x[:, c][keep]  # the visible positions of channel c, of every image
        mean, var = visible.mean(), visible.var(unbiased=False)
        expected = (x[:, c] - mean) / torch.sqrt(var + bn.eps) * bn.weight[c] + bn.bias[c]
        torch.testing.assert_close(out[:, c][keep], expected[keep], rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, c][~keep], torch.zeros_like(out[:, c][~keep]))
        torch.testing.assert_close(bn.running_mean[c], 0.9 * running_mean[c] + 0.1 * mean)
        torch.testing.assert_close(bn.running_var[c], 0.9 * running_var[c] + 0.1 * visible.var(unbiased=True))
    # Evaluation normalises with the running statistics, masked positions still 0.
    model.eval()
    model(pixel_values, bool_masked_pos=mask)
    x, out = store["bn_in"], store["bn_out"]
    expected = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
    expected = (expected * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)) * keep_at(masked_pixels, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_grn_statistics_come_from_visible_positions():
    config = tiny_convnet_config("convnextv2")
    model = SimMIMModel(config).train()
    randomise_biases(model)
    grn = model.encoder.encoder.stages[1].layers[0].grn
    pixel_values, mask, masked_pixels = inputs(config)
    store = {}
    _capture(grn, store, "grn")
    model(pixel_values, bool_masked_pos=mask)
    x, out = store["grn_in"], store["grn_out"]  # channels last: (N, 8, 8, 64), before the mask
    keep = keep_at(masked_pixels, 8)[:, 0].bool()  # (N, 8, 8)
    assert (x[~keep].abs().sum()) > 0  # the raw input is not zero at masked positions: the mask matters
    for n in range(x.shape[0]):
        visible = x[n][keep[n]]  # (visible positions, C)
        norms = visible.pow(2).sum(dim=0).sqrt()  # L2 over visible positions, per channel
        scale = norms / (norms.mean() + 1e-6)
        expected = grn.weight.flatten() * (visible * scale) + grn.bias.flatten() + visible
        torch.testing.assert_close(out[n][keep[n]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_mode_puts_the_mask_token_at_the_stem_output(family):
    config = tiny_convnet_config(family, conv_masking="token")
    assert config.decoder_type == "linear"
    model = SimMIMModel(config).eval()
    stem = model.encoder.embedder if family == "resnet" else model.encoder.embeddings
    store = {}
    _capture(stem, store, "stem")
    _capture(model.encoder.encoder.stages[0], store, "stage0")
    pixel_values, mask, masked_pixels = inputs(config)
    model(pixel_values, bool_masked_pos=mask)
    assert torch.equal(store["stem_in"], pixel_values)  # no pixel is zeroed in token mode
    raw = store["stem_out"]
    # The stage sees the stem output, its masked positions replaced: x * (1 - m) + token * m.
    m = 1.0 - keep_at(masked_pixels, raw.shape[-1])
    token = model.mask_token.detach().view(1, -1, 1, 1)
    assert "mask_token" in dict(model.named_parameters()) and token.abs().sum() > 0
    torch.testing.assert_close(store["stage0_in"], raw * (1 - m) + token * m, rtol=0, atol=1e-7)


def _reference_loss(target, reconstruction, masked_pixels, loss_type):
    diff = reconstruction - target
    per_pixel = {
        "l1": diff.abs(),
        "l2": diff**2,
        "smooth_l1": torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5),
    }[loss_type]
    m = masked_pixels.float()
    return ((per_pixel * m).sum() / (m.sum() + 1e-5) / target.shape[1]).item()


def _normalised_per_cell(pixel_values, cell):
    """Each cell x cell block, all channels: minus its mean, over sqrt(unbiased variance + 1e-6)."""
    target = torch.empty_like(pixel_values)
    for n in range(pixel_values.shape[0]):
        for i in range(0, pixel_values.shape[-2], cell):
            for j in range(0, pixel_values.shape[-1], cell):
                block = pixel_values[n, :, i : i + cell, j : j + cell]
                target[n, :, i : i + cell, j : j + cell] = (block - block.mean()) / (block.var() + 1e-6).sqrt()
    return target


@pytest.mark.parametrize("norm_target", [False, True])
@pytest.mark.parametrize("loss_type", ["l1", "l2", "smooth_l1"])
@pytest.mark.parametrize("encoder", ["convnextv2", "vit"])
def test_every_loss_follows_its_formula(encoder, loss_type, norm_target):
    if encoder == "vit":
        config = tiny_simmim_config("vit").with_overrides(loss_type=loss_type, norm_target=norm_target)
    else:
        config = tiny_convnet_config(encoder, loss_type=loss_type, norm_target=norm_target)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask, masked_pixels = inputs(config)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
    target = _normalised_per_cell(pixel_values, config.mask_patch_size) if norm_target else pixel_values
    expected = _reference_loss(target, output.reconstruction, masked_pixels, loss_type)
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)


def test_conv_decoder_fills_masked_positions_with_its_mask_token():
    config = tiny_convnet_config("convnextv2")
    model = SimMIMForMaskedImageModeling(config).eval()
    assert isinstance(model.decoder, SimMIMConvDecoder) and len(model.decoder.blocks) == config.decoder_depth
    store = {}
    _capture(model.decoder.blocks[0], store, "block")
    pixel_values, mask, masked_pixels = inputs(config)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
    m = 1 - keep_at(masked_pixels, 4)
    token = model.decoder.mask_token.view(1, -1, 1, 1).expand(2, -1, 4, 4)
    assert torch.equal(store["block_in"] * m, token * m)
    assert output.reconstruction.shape == pixel_values.shape
    assert "decoder.mask_token" in no_weight_decay_names(model)
    assert all(name in no_weight_decay_names(model) for name, _ in model.named_parameters() if ".grn." in name)


def _macs_by_hooks(config):
    """Multiply-accumulates of every Conv2d and Linear of the stock encoder, measured on a forward pass."""
    encoder = AutoModel.from_config(config.encoder_config).eval()
    total = []

    def count(module, args, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        total.append(output.numel() * per_output)

    for module in encoder.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
    with torch.no_grad():
        encoder(torch.zeros(1, 3, 32, 32))
    return sum(total)


def test_flops_per_image_counts_every_convolution():
    config = tiny_convnet_config("convnext")
    # By hand: stem 3*8*2*2 MACs at 16x16; stage 1: depthwise 8*49 + pointwise 2*8*32 per position at 16x16;
    # stage 2: 2x2 downsampling 8*16*4 at 8x8, 2 blocks of 16*49 + 2*16*64; stage 3: 16*24*4 at 4x4, 24*49 + 2*24*96.
    by_hand = 3 * 8 * 4 * 256 + (8 * 49 + 2 * 8 * 32) * 256
    by_hand += 8 * 16 * 4 * 64 + 2 * (16 * 49 + 2 * 16 * 64) * 64
    by_hand += 16 * 24 * 4 * 16 + (24 * 49 + 2 * 24 * 96) * 16
    assert conv_forward_macs(config) == by_hand == 768384
    assert flops_per_image(config, matmul_params=0, tokens=0) == 6 * by_hand
    for config in (tiny_convnet_config("convnextv2"), tiny_convnet_config("resnet"), resnet_with(layer_type="basic")):
        assert conv_forward_macs(config) == _macs_by_hooks(config), config.encoder_type
    assert conv_forward_macs(resnet_with(downsample_in_bottleneck=True)) == _macs_by_hooks(
        resnet_with(downsample_in_bottleneck=True)
    )


def test_config_mistakes_name_the_field():
    with pytest.raises(ValueError, match="conv_masking: applies to ConvNet encoders"):
        SimMIMConfig(encoder_config=tiny_simmim_config("vit").encoder_config, mask_patch_size=8, conv_masking="sparse")
    with pytest.raises(
        ValueError, match=r"mask_patch_size=4 must be a multiple of the convnextv2 encoder's output stride 8"
    ):
        tiny_convnet_config("convnextv2", mask_patch_size=4)
    with pytest.raises(ValueError, match="image_size 40 must be divisible by mask_patch_size=16"):
        tiny_convnet_config("resnet", mask_patch_size=16).with_overrides(image_size=40)
    with pytest.raises(ValueError, match="image_size 36 must be divisible by mask_patch_size=8"):
        tiny_convnet_config("resnet").with_overrides(image_size=36)  # nor by the stride, which divides the cell
    with pytest.raises(ValueError, match="decoder_type='linear' cannot reconstruct with conv_masking='sparse'"):
        tiny_convnet_config("convnext", decoder_type="linear")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        tiny_convnet_config("convnext", loss_type="l3")
    with pytest.raises(ValueError, match="conv_masking must be one of"):
        tiny_convnet_config("convnext", conv_masking="dense")
    with pytest.raises(
        ValueError, match=r"unknown encoder type 'regnet'; supported: .*'convnext', 'convnextv2', 'resnet'"
    ):
        SimMIMConfig(encoder_config={"model_type": "regnet"})
    with pytest.raises(
        ValueError, match="depths/hidden_sizes/num_stages: the convnext encoder needs one entry per stage"
    ):
        tiny_convnet_config("convnext").with_overrides(depths=[1, 1])
    # The ViT/Swin defaults keep the paper's head and loss.
    vit = tiny_simmim_config("vit")
    assert (vit.conv_masking, vit.decoder_type, vit.loss_type, vit.norm_target) == (None, "linear", "l1", False)


@pytest.mark.parametrize(
    "preset, stride, last_map",
    [
        ("convnextv2-demo", 8, 4),
        ("convnextv2-tiny-224", 32, 7),
        ("convnextv2-base-224", 32, 7),
        ("resnet50-224", 32, 7),
    ],
)
def test_presets(preset, stride, last_map):
    config = SimMIMConfig.from_preset(preset)
    assert config.encoder_stride == stride and config.image_size // stride == last_map >= 2
    assert (config.conv_masking, config.decoder_type, config.mask_ratio) == ("sparse", "conv", 0.6)
    assert config.mask_patch_size == (8 if preset == "convnextv2-demo" else 32)
    assert SimMIMConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each family after a masked training pass (so BatchNorm's running statistics moved), exported."""
    from simmim_hf.publish.convert import export_encoder

    root = tmp_path_factory.mktemp("convnets")
    pixel_values, _, _ = inputs(tiny_convnet_config("resnet"))
    torch.save(pixel_values, root / "x.pt")
    models = {}
    for family in FAMILIES:
        config = tiny_convnet_config(family)
        model = SimMIMForMaskedImageModeling(config).train()
        model(*inputs(config)[:2]).loss.backward()
        model.eval()
        export_encoder(model, root / family)
        torch.save(inputs(config)[1], root / family / "mask.pt")  # this family's patch grid
        model.save_pretrained(root / f"{family}-simmim")  # the full checkpoint, with its remote code
        models[family] = model
    return root, models


def test_export_and_remote_code_load_in_a_fresh_process(exported):
    root, models = exported
    out = run_python(f"""
        import json, torch
        from transformers import AutoModel
        result = {{}}
        from transformers import AutoModelForMaskedImageModeling
        x = torch.load({str(root / "x.pt")!r}, weights_only=True)
        for family in {FAMILIES!r}:
            mask = torch.load({str(root)!r} + "/" + family + "/mask.pt", weights_only=True)
            full = AutoModelForMaskedImageModeling.from_pretrained(
                {str(root)!r} + "/" + family + "-simmim", trust_remote_code=True
            ).eval()
            with torch.no_grad():
                torch.save(full(x, bool_masked_pos=mask).loss, {str(root)!r} + "/" + family + "/remote_loss.pt")
            model = AutoModel.from_pretrained({str(root)!r} + "/" + family).eval()
            torch.save(model.state_dict(), {str(root)!r} + "/" + family + "/reloaded.pt")
            with torch.no_grad():
                torch.save(model(x).last_hidden_state, {str(root)!r} + "/" + family + "/features.pt")
            result[family] = type(model).__name__
        print(json.dumps(result))
        print("simmim_hf" in sys.modules)
        """)
    classes, imported = out.split("\n")[-3:-1]
    assert json.loads(classes) == {
        "convnext": "ConvNextModel",
        "convnextv2": "ConvNextV2Model",
        "resnet": "ResNetModel",
    }
    assert imported == "False"
    x = torch.load(root / "x.pt")
    for family, model in models.items():
        ours = model.simmim.encoder.state_dict()
        reloaded = torch.load(root / family / "reloaded.pt")
        assert set(reloaded) == set(ours), family
        assert all(torch.equal(reloaded[key], ours[key]) for key in ours), family
        with torch.no_grad():  # unmasked, the hooks do nothing: the stock model's features
            features = model.simmim(x).last_hidden_state
        assert torch.equal(torch.load(root / family / "features.pt"), features), family
        # The full checkpoint through its remote code (sparse hooks included) gives the same masked loss.
        with torch.no_grad():
            loss = model(x, bool_masked_pos=torch.load(root / family / "mask.pt")).loss
        assert torch.equal(torch.load(root / family / "remote_loss.pt"), loss), family


def test_reconstruction_pictures_of_normalised_targets_are_denormalised_per_cell():
    from simmim_hf.visualization import denormalize, reconstruction_rows

    config = tiny_convnet_config("convnextv2", norm_target=True)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask, masked_pixels = inputs(config)
    rows = reconstruction_rows(model, pixel_values, mask)
    with torch.no_grad():
        predicted = model(pixel_values, bool_masked_pos=mask).reconstruction  # in units of each cell's statistics
    cell = config.mask_patch_size
    expected = pixel_values.clone()
    for n in range(2):
        for i in range(0, 32, cell):
            for j in range(0, 32, cell):
                if masked_pixels[n, 0, i, j]:
                    block = pixel_values[n, :, i : i + cell, j : j + cell]
                    window = (n, slice(None), slice(i, i + cell), slice(j, j + cell))
                    expected[window] = predicted[window] * (block.var() + 1e-6).sqrt() + block.mean()
    reference = denormalize(expected, config.image_mean, config.image_std)
    torch.testing.assert_close(rows[2], reference, rtol=1e-5, atol=1e-5)


def test_backbone_classes_carry_the_encoder_tensors(exported):
    from simmim_hf.eval.dense import load_backbone

    root, models = exported
    for family, model in models.items():
        backbone = load_backbone(root / family)
        assert type(backbone).__name__ == {"convnext": "ConvNextBackbone", "convnextv2": "ConvNextV2Backbone"}.get(
            family, "ResNetBackbone"
        )
        ours = model.simmim.encoder.state_dict()
        shared = [key for key in backbone.state_dict() if key in ours]
        assert len(shared) > 10 and all(torch.equal(backbone.state_dict()[key], ours[key]) for key in shared), family


@pytest.mark.parametrize("family", FAMILIES)
def test_from_encoder_starts_from_a_stock_classifier(tmp_path, family):
    from transformers import AutoModelForImageClassification

    encoder_config = tiny_convnet_config(family).encoder_config
    classifier = AutoModelForImageClassification.from_config(encoder_config)
    classifier.save_pretrained(tmp_path)
    model = SimMIMForMaskedImageModeling.from_encoder(str(tmp_path), decoder_hidden_size=16)
    assert (model.config.encoder_type, model.config.conv_masking, model.config.mask_patch_size) == (
        family,
        "sparse",
        8,
    )
    stock = getattr(classifier, classifier.base_model_prefix).state_dict()
    ours = model.simmim.encoder.state_dict()
    assert set(ours) == set(stock) and all(torch.equal(ours[key], stock[key]) for key in stock)


def test_a_deep_copy_masks_with_its_own_state():
    """Trainer utilities (EMA, model copies) deep-copy models: the copy's hooks must read the copy's mask state."""
    import copy

    config = tiny_convnet_config("resnet")
    model = SimMIMModel(config).train()
    clone = copy.deepcopy(model)
    hook = next(iter(clone.encoder.embedder._forward_hooks.values()))
    assert hook.state is clone._mask_state is clone.encoder.embedder.embedder.normalization._mask_state
    assert clone._mask_state is not model._mask_state
    pixel_values, mask, _ = inputs(config)
    a = model(pixel_values, bool_masked_pos=mask).last_hidden_state
    assert torch.equal(a, clone(pixel_values, bool_masked_pos=mask).last_hidden_state)
