import pytest
import torch
from tiny_configs import tiny_simmim_config

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator, SimMIMModel
from simmim_hf.modeling_simmim import masked_l1_loss, upsample_mask


def make_inputs(config, batch_size=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
    pixel_values = torch.randn(batch_size, config.num_channels, height, width, generator=generator)
    mask = SimMIMMaskGenerator.from_config(config)(batch_size, generator=generator)
    return pixel_values, mask


def reference_loss(pixel_values, reconstruction, bool_masked_pos, patch):
    """The paper's loss written out pixel by pixel with Python loops over masked patches."""
    batch, channels, height, width = pixel_values.shape
    grid_w = width // patch
    total, count = 0.0, 0
    for b in range(batch):
        for index in bool_masked_pos[b].nonzero().flatten().tolist():
            row, col = divmod(index, grid_w)
            window = (slice(None), slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch))
            total += (pixel_values[b][window] - reconstruction[b][window]).abs().sum().item()
            count += patch * patch
    return total / (count + 1e-5) / channels


@pytest.mark.parametrize("encoder", ["vit", "swin", "beit"])
def test_forward_shapes_and_loss_formula(encoder):
    config = tiny_simmim_config(encoder)
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = make_inputs(config)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
    assert output.reconstruction.shape == pixel_values.shape
    expected = reference_loss(pixel_values, output.reconstruction, mask, config.model_patch_size)
    assert output.loss.item() == pytest.approx(expected, rel=1e-5)


def test_loss_ignores_visible_pixels():
    pixel_values = torch.randn(2, 3, 16, 16)
    reconstruction = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    pixel_mask = upsample_mask(mask, (4, 4), 4)
    base = masked_l1_loss(pixel_values, reconstruction, pixel_mask)
    visible_changed = reconstruction + 10 * (~pixel_mask)
    masked_changed = reconstruction + 10 * pixel_mask
    assert masked_l1_loss(pixel_values, visible_changed, pixel_mask) == pytest.approx(base.item(), rel=1e-6)
    assert masked_l1_loss(pixel_values, masked_changed, pixel_mask) > base + 1


def test_no_mask_gives_reconstruction_without_loss():
    config = tiny_simmim_config("vit")
    output = SimMIMForMaskedImageModeling(config)(make_inputs(config)[0])
    assert output.loss is None and output.reconstruction.shape == (3, 3, 32, 32)


def test_mask_token_replaces_masked_patches_only():
    config = tiny_simmim_config("vit", num_hidden_layers=1)
    model = SimMIMModel(config).eval()
    pixel_values, _ = make_inputs(config, batch_size=1)
    with torch.no_grad():
        plain = model(pixel_values).last_hidden_state
        nothing_masked = model(pixel_values, bool_masked_pos=torch.zeros(1, 64, dtype=torch.bool)).last_hidden_state
        model.encoder.embeddings.mask_token.fill_(3.0)
        everything_masked = model(pixel_values, bool_masked_pos=torch.ones(1, 64, dtype=torch.bool))
        other_image = model(torch.randn_like(pixel_values), bool_masked_pos=torch.ones(1, 64, dtype=torch.bool))
    assert torch.allclose(plain, nothing_masked)
    # With every patch masked the image no longer matters (the position embeddings still do).
    assert torch.allclose(everything_masked.last_hidden_state, other_image.last_hidden_state, atol=1e-6)


def test_a_partial_mask_replaces_exactly_the_masked_patches_with_the_token():
    """ViT embeddings written out: token i = (masked_i ? mask_token : W . patch_i + b) + pos_(i+1), after the CLS
    token (cls + pos_0); patches p x p, row-major, flattened channel-first like the projection's weight."""
    config = tiny_simmim_config("vit", num_hidden_layers=1)
    embeddings = SimMIMModel(config).eval().encoder.embeddings
    pixel_values, mask = make_inputs(config, batch_size=2)
    assert 0 < mask.sum() < mask.numel() and mask.sum(1).min() > 0 and (~mask).sum(1).min() > 0
    with torch.no_grad():
        embeddings.mask_token.normal_()  # far from any patch embedding
        output = embeddings(pixel_values, bool_masked_pos=mask)
    batch, channels, height, width = pixel_values.shape
    patch = config.model_patch_size
    patches = pixel_values.unfold(2, patch, patch).unfold(3, patch, patch)  # (B, C, gh, gw, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(batch, -1, channels * patch * patch)
    projection = embeddings.patch_embeddings.projection
    tokens = patches @ projection.weight.reshape(projection.weight.shape[0], -1).T + projection.bias
    tokens = torch.where(mask.unsqueeze(-1), embeddings.mask_token.reshape(1, 1, -1), tokens)
    expected = torch.cat([embeddings.cls_token.expand(batch, -1, -1), tokens], dim=1) + embeddings.position_embeddings
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-5)
    # The visible tokens do not depend on the token, the masked ones do not depend on the image.
    masked = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), mask], dim=1)
    token_at_masked = (output - embeddings.position_embeddings)[masked]
    assert torch.allclose(token_at_masked, embeddings.mask_token.reshape(1, -1).expand_as(token_at_masked), atol=1e-6)


def test_mask_token_is_initialised_nonzero_and_trained():
    # A 1024-wide token, so the sample statistics are tight: the paper's normal of std 0.02 (truncated at +-2, i.e.
    # untruncated in effect). 4-sigma bands: the sample std of n normals has sd std / sqrt(2 (n - 1)), the mean
    # std / sqrt(n); a zero token (the stock init) or the wrong std (0.01 or 0.04) falls outside.
    wide = tiny_simmim_config("vit", hidden_size=1024, num_hidden_layers=1, intermediate_size=64)
    values = SimMIMForMaskedImageModeling(wide).simmim.encoder.embeddings.mask_token.detach().flatten()
    n = values.numel()
    assert n == 1024
    assert abs(values.std().item() - 0.02) < 4 * 0.02 / (2 * (n - 1)) ** 0.5
    assert abs(values.mean().item()) < 4 * 0.02 / n**0.5
    config = tiny_simmim_config("vit")
    model = SimMIMForMaskedImageModeling(config)
    token = model.simmim.encoder.embeddings.mask_token
    pixel_values, mask = make_inputs(config)
    model(pixel_values, bool_masked_pos=mask).loss.backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_greyscale_single_channel():
    config = SimMIMConfig.from_preset(
        "demo", num_channels=1, hidden_size=32, num_hidden_layers=1, intermediate_size=64
    )
    model = SimMIMForMaskedImageModeling(config)
    pixel_values, mask = make_inputs(config, batch_size=2)
    assert pixel_values.shape[1] == 1
    output = model(pixel_values, bool_masked_pos=mask)
    assert output.reconstruction.shape == (2, 1, 32, 32) and torch.isfinite(output.loss)


@pytest.mark.parametrize("encoder", ["vit", "swin"])
def test_non_square_images(encoder):
    config = tiny_simmim_config(encoder, image_size=[32, 48])
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = make_inputs(config, batch_size=2)
    assert mask.shape[1] == (32 // config.model_patch_size) * (48 // config.model_patch_size)
    with torch.no_grad():
        output = model(pixel_values, bool_masked_pos=mask)
    assert output.reconstruction.shape == (2, 3, 32, 48)
    assert output.loss.item() == pytest.approx(
        reference_loss(pixel_values, output.reconstruction, mask, config.model_patch_size), rel=1e-5
    )


def test_hidden_states_and_tuple_output():
    config = tiny_simmim_config("vit")
    model = SimMIMForMaskedImageModeling(config).eval()
    pixel_values, mask = make_inputs(config)
    output = model(pixel_values, bool_masked_pos=mask, output_hidden_states=True)
    assert len(output.hidden_states) == config.encoder_config.num_hidden_layers + 1
    loss, reconstruction = model(pixel_values, bool_masked_pos=mask, return_dict=False)[:2]
    assert torch.allclose(loss, output.loss)


def test_no_weight_decay_set():
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    names = model.no_weight_decay()
    for expected in ("mask_token", "cls_token", "position_embeddings", "layernorm.weight", "decoder.0.bias"):
        assert any(expected in name for name in names), expected
    decayed = {name for name, _ in model.named_parameters()} - names
    assert "decoder.0.weight" in decayed
    assert all(param.ndim >= 2 for name, param in model.named_parameters() if name in decayed)
    swin_names = SimMIMForMaskedImageModeling(tiny_simmim_config("swin")).no_weight_decay()
    assert any("relative_position_bias_table" in name for name in swin_names)


def test_layer_ids_vit_and_swin():
    vit = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    ids = {name: vit.layer_id(name) for name, _ in vit.named_parameters()}
    assert ids["simmim.encoder.embeddings.mask_token"] == 0
    assert vit.layer_id("simmim.encoder.encoder.layer.1.attention.attention.query.weight") == 2  # on-disk names
    assert max(ids.values()) == vit.num_layers() + 1 == 3
    assert sorted(set(ids.values())) == [0, 1, 2, 3]
    swin = SimMIMForMaskedImageModeling(tiny_simmim_config("swin"))
    assert swin.num_layers() == 3
    swin_ids = {swin.layer_id(name) for name, _ in swin.named_parameters()}
    assert swin_ids == {0, 1, 2, 3, 4}
    assert swin.layer_id("simmim.encoder.encoder.layers.1.blocks.1.attention.q_proj.weight") == 3


def test_save_and_load_round_trip_with_safetensors(tmp_path):
    config = tiny_simmim_config("swin")
    model = SimMIMForMaskedImageModeling(config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    pixel_values, mask = make_inputs(config)
    with torch.no_grad():
        assert torch.equal(model(pixel_values, mask).reconstruction, loaded(pixel_values, mask).reconstruction)
