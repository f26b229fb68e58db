import pytest
from tiny_configs import tiny_swin, tiny_vit

from simmim_hf import PRESETS, SimMIMConfig


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_builds_and_validates(name):
    config = SimMIMConfig.from_preset(name)
    assert config.preset == name
    assert config.mask_ratio == 0.6
    assert config.image_size % config.mask_patch_size == 0
    assert config.mask_patch_size % config.model_patch_size == 0


def test_required_presets_exist():
    assert {
        "vit-base-patch16-224",
        "swin-base-window6-192",
        "beit-base-patch16-224",
        "demo",
    } <= set(PRESETS)


def test_swin_base_preset_matches_paper():
    config = SimMIMConfig.from_preset("swin-base-window6-192")
    encoder = config.encoder_config
    assert (encoder.embed_dim, list(encoder.depths), encoder.window_size) == (128, [2, 2, 18, 2], 6)
    assert (config.image_size, config.mask_patch_size, config.model_patch_size, config.encoder_stride) == (
        192,
        32,
        4,
        32,
    )


def test_beit_preset_is_the_official_vit_b_recipe():
    encoder = SimMIMConfig.from_preset("beit-base-patch16-224").encoder_config
    assert encoder.use_absolute_position_embeddings is False
    assert encoder.use_shared_relative_position_bias is True
    assert encoder.use_relative_position_bias is False
    assert encoder.layer_scale_init_value == pytest.approx(0.1)
    assert encoder.use_mask_token is True
    assert (encoder.hidden_size, encoder.num_hidden_layers, encoder.patch_size) == (768, 12, 16)


def test_preset_overrides_reach_simmim_and_encoder_fields():
    config = SimMIMConfig.from_preset("demo", mask_ratio=0.5, hidden_size=64, num_channels=1)
    assert config.mask_ratio == 0.5
    assert config.encoder_config.hidden_size == 64
    assert config.num_channels == 1 and len(config.image_mean) == 1


def test_encoder_stride_is_derived():
    assert SimMIMConfig(encoder_config=tiny_vit(), mask_patch_size=8).encoder_stride == 4
    assert SimMIMConfig(encoder_config=tiny_swin(), mask_patch_size=8).encoder_stride == 4  # 2 px patch, 2 stages


def test_round_trip_through_dict_keeps_encoder_class(tmp_path):
    config = SimMIMConfig.from_preset("swin-base-window6-192", mask_ratio=0.3)
    config.save_pretrained(tmp_path)
    loaded = SimMIMConfig.from_pretrained(tmp_path)
    assert type(loaded.encoder_config).__name__ == "SwinConfig"
    assert loaded.mask_ratio == 0.3 and loaded.preset == "swin-base-window6-192"
    assert loaded.encoder_config.depths == [2, 2, 18, 2]


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: SimMIMConfig(encoder_config=tiny_vit(image_size=36), mask_patch_size=8), "image_size"),
        (
            lambda: SimMIMConfig(encoder_config=tiny_vit(patch_size=8), mask_patch_size=12, image_size=48),
            "mask_patch_size",
        ),
        (lambda: SimMIMConfig(encoder_config=tiny_vit(), mask_patch_size=8, mask_ratio=1.2), "mask_ratio"),
        (lambda: SimMIMConfig(encoder_config=tiny_vit(), mask_patch_size=8, mask_ratio=0.0), "mask_ratio"),
        (lambda: SimMIMConfig.from_preset("vit-huge-nonexistent"), "preset"),
        (lambda: SimMIMConfig(encoder_config={"model_type": "bert"}), "encoder_config"),
        (lambda: SimMIMConfig.from_preset("demo", not_a_field=3), "not_a_field"),
        (lambda: SimMIMConfig(encoder_config=tiny_vit(), mask_patch_size=8, image_mean=[0.5]), "image_mean"),
        (lambda: SimMIMConfig.from_preset("swin-base-window6-192", hidden_size=64), "hidden_size"),
        (lambda: SimMIMConfig.from_preset("swin-base-window6-192", num_hidden_layers=3), "num_hidden_layers"),
    ],
)
def test_invalid_combinations_raise_value_error_naming_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()


def test_derived_encoder_fields_follow_overrides():
    beit = SimMIMConfig.from_preset("beit-base-patch16-224", num_hidden_layers=4).encoder_config
    assert (beit.stage_names[-1], beit.out_features, beit.out_indices) == ("stage4", ["stage4"], [4])
    swin = SimMIMConfig.from_preset("swin-base-window6-192", depths=[2, 2, 2], num_heads=[4, 8, 16]).encoder_config
    assert (swin.stage_names[-1], swin.out_features, swin.num_layers, swin.hidden_size) == (
        "stage3",
        ["stage3"],
        3,
        512,
    )
    assert SimMIMConfig.from_preset("vit-base-patch16-224", hidden_size=384).encoder_config.pooler_output_size == 384
    # An explicit choice is kept, and checked against the new depth by the encoder's own config.
    picked = SimMIMConfig.from_preset("beit-base-patch16-224", out_indices=[2, 4]).with_overrides(num_hidden_layers=6)
    assert picked.encoder_config.out_features == ["stage2", "stage4"]


def test_checkpoint_config_written_with_stale_derived_fields_still_loads(tmp_path):
    import json

    config = SimMIMConfig.from_preset("beit-base-patch16-224", num_hidden_layers=4)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # What earlier versions wrote: the default depth's backbone fields next to num_hidden_layers=4.
    saved["encoder_config"].update(
        stage_names=["stem"] + [f"stage{i}" for i in range(1, 13)], out_features=["stage12"], out_indices=[12]
    )
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert SimMIMConfig.from_pretrained(tmp_path).encoder_config.out_features == ["stage4"]


def test_swin_window_larger_than_a_stage_grid_is_refused_with_the_field_named():
    # Swin-L's official 192 px / window 12 recipe: stage 4 is 6x6. transformers' SwinModel fails in its forward pass
    # on it (one window for every stage), so the config refuses it up front.
    with pytest.raises(ValueError, match=r"window_size=12 is larger than stage 4's 6x6"):
        SimMIMConfig.from_preset("swin-base-window6-192", window_size=12)
    assert "swin-large-window12-192" not in PRESETS
    SimMIMConfig.from_preset("swin-base-window6-192", window_size=12, image_size=384)  # 12x12 at stage 4: fine


def test_overrides_are_routed_and_validated_the_same_from_a_preset_and_from_its_checkpoint(tmp_path):
    """`SimMIMConfig.for_pretraining` is the one override routine: the same overrides on a preset and on a checkpoint
    of that preset give the same config, and its validation (not the caller's) refuses a new channel count without
    statistics on a checkpoint."""
    overrides = {"mask_ratio": 0.4, "mask_patch_size": 16, "hidden_dropout_prob": 0.1, "num_hidden_layers": 2}
    fresh = SimMIMConfig.for_pretraining("demo", **overrides)
    SimMIMConfig.from_preset("demo").save_pretrained(tmp_path)
    continued = SimMIMConfig.for_pretraining(model_name_or_path=str(tmp_path), **overrides)
    assert fresh.to_dict() == continued.to_dict()
    assert (fresh.mask_ratio, fresh.encoder_config.num_hidden_layers) == (0.4, 2)
    settings, encoder_fields = SimMIMConfig.split_overrides(overrides)
    assert settings == {"mask_ratio": 0.4, "mask_patch_size": 16}
    assert encoder_fields == {"hidden_dropout_prob": 0.1, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="num_channels.*image_mean"):
        SimMIMConfig.for_pretraining(model_name_or_path=str(tmp_path), num_channels=1)
    with pytest.raises(ValueError, match="init_encoder_from.*model_name_or_path"):
        SimMIMConfig.for_pretraining(model_name_or_path=str(tmp_path), init_encoder_from=str(tmp_path))


@pytest.mark.parametrize(
    "stats, field",
    [
        ({"image_mean": [0.5] * 3, "image_std": [0.3, 0.0, 0.3]}, "image_std"),
        ({"image_mean": [0.5] * 3, "image_std": [-0.2] * 3}, "image_std"),
        ({"image_mean": [0.5] * 3, "image_std": [float("nan")] * 3}, "image_std"),
        ({"image_mean": [float("inf")] * 3, "image_std": [0.3] * 3}, "image_mean"),
    ],
)
def test_non_positive_or_non_finite_statistics_are_refused_naming_the_field(stats, field):
    # The pixels are divided by image_std, so 0 or a negative value would train on
    # inf/NaN or flipped pixels without a word.
    with pytest.raises(ValueError, match=rf"^{field} must be finite"):
        SimMIMConfig.from_preset("demo", **stats)
    SimMIMConfig.from_preset("demo", image_mean=[0.5] * 3, image_std=[0.3] * 3)  # a valid pair still builds
