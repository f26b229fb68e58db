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
    # transformers' rule (`can_return_tuple`): the argument, else `config.return_dict`, for both models.
    encoder_tuple = model.simmim(pixel_values, bool_masked_pos=mask, return_dict=False)
    as_dict = model.simmim(pixel_values, bool_masked_pos=mask)
    assert isinstance(encoder_tuple, tuple) and torch.equal(encoder_tuple[0], as_dict.last_hidden_state)
    model.config.return_dict = False
    assert isinstance(model(pixel_values, bool_masked_pos=mask), tuple)
    assert not isinstance(model(pixel_values, bool_masked_pos=mask, return_dict=True), tuple)


def _count_inits(monkeypatch):
    """Spies on the official init and on the mask-token pass: how often each ran."""
    import collections

    import simmim_hf.modeling_simmim as modeling

    calls = collections.Counter()
    for name in ("init_official_weights", "_init_after_post_init"):
        function = getattr(modeling, name)

        def counted(*args, _function=function, _name=name, **kwargs):
            calls[_name] += 1
            return _function(*args, **kwargs)

        monkeypatch.setattr(modeling, name, counted)
    return calls


@pytest.mark.parametrize("encoder", ["vit", "swin", "beit"])
def test_the_model_is_initialised_once(monkeypatch, encoder):
    """One construction = one init: the official init (BEiT, Swin) or the stock encoder's own, never both and never
    twice; the mask-token pass once. With the stock init the encoder is exactly a stock encoder built alone from the
    same seed, the mask token a normal of std 0.02 (truncated at +-2, i.e. barely)."""
    from transformers import AutoModel

    from simmim_hf.backbones import encoder_kwargs

    config = tiny_simmim_config(encoder)
    calls = _count_inits(monkeypatch)
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(config)
    official = config.initializer == "official"
    assert calls["_init_after_post_init"] == 1
    assert calls["init_official_weights"] == (1 if official else 0)
    stock = SimMIMConfig(encoder_config=config.encoder_config, mask_patch_size=config.mask_patch_size,
                         initializer="stock")  # fmt: skip
    calls.clear()
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(stock)
    assert (calls["_init_after_post_init"], calls["init_official_weights"]) == (1, 0)
    torch.manual_seed(0)
    encoder_class = AutoModel._model_mapping[type(stock.encoder_config)]
    alone = encoder_class(stock.encoder_config, **encoder_kwargs(stock.encoder_config)).state_dict()
    for name, value in model.simmim.encoder.state_dict().items():
        if not name.endswith("mask_token"):
            assert torch.equal(value, alone[name]), name
    token = model.simmim.encoder.embeddings.mask_token
    assert torch.count_nonzero(token) == token.numel() and abs(token.std().item() / 0.02 - 1) < 0.5


def test_each_module_is_initialised_at_most_once(monkeypatch):
    """transformers runs a module's `_init_weights` only while it is not flagged initialised: count those runs."""
    from transformers import PreTrainedModel

    runs = {}
    original = PreTrainedModel._initialize_weights

    def spy(self, module, is_custom_code=False):
        if not getattr(module, "_is_hf_initialized", False):
            runs[id(module)] = runs.get(id(module), 0) + 1
        return original(self, module, is_custom_code)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", spy)
    for encoder in ("vit", "swin"):
        runs.clear()
        model = SimMIMForMaskedImageModeling(tiny_simmim_config(encoder))
        modules = {id(m) for m in model.modules()}
        assert runs and set(runs) <= modules and max(runs.values()) == 1, encoder
        if model.config.initializer == "official":  # the encoder and head keep the official init: no other run
            assert not set(runs) & {id(m) for m in model.simmim.encoder.modules()}
            assert not set(runs) & {id(m) for m in model.decoder.modules()}
