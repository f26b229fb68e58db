"""ConvNet encoders through the user's workflows: scripts/pretrain.py killed and rerun (bitwise), two ranks over gloo
starting from a stock ConvNeXt, `--init_encoder_from` stock folders, `--config_overrides` of stages and widths, the
record and the card, `pipeline("image-feature-extraction")`, frozen features, fine-tuning with layer decay, and the
mistakes that are one line and exit 2.

One tiny ConvNeXt V2 chain of scripts/pretrain.py runs (uninterrupted, killed, rerun) and one 2-rank run are shared by
the module's assertions (the chain is also the test that the `convnextv2-demo` preset pretrains and exports).
"""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pretrain_helpers import LAUNCH_TWO, PROBE, PROBE_SCRIPT, launch, loss_curve, pretrain_args, run, together
from test_faults import run_script_in_process
from tiny_configs import CONVNETS
from transformers import AutoModel, AutoModelForImageClassification, ViTImageProcessor

from simmim_hf.data.fashion_mnist import MEAN, STD
from simmim_hf.pretrain.arguments import ModelArguments
from simmim_hf.pretrain.run import build_config, build_model

MAX_STEPS = 6
KILL_STEP = random.Random(19).randint(3, MAX_STEPS - 1)  # seeded: the same step on every run of the suite
# The convnextv2-demo preset made tiny through --config_overrides (stages, widths, decoder) with non-default loss
# choices, so that the record and the card have something to state.
OVERRIDES = "depths=[1,1,1],hidden_sizes=[8,16,24],decoder_hidden_size=16,loss_type=l2,norm_target=true"
CPU = {"ACCELERATE_USE_CPU": "true"}


def convnext_args(shards, output: Path, *extra: str) -> list[str]:
    return pretrain_args(shards, output, MAX_STEPS, "--save_steps", "2", *extra, preset="convnextv2-demo",
                         overrides=OVERRIDES)  # fmt: skip


def save_stock(folder: Path, family: str, classifier: bool) -> Path:
    """A tiny random stock ConvNet (bare or with its classifier) and an image processor, as a user's folder."""
    torch.manual_seed(0)
    config = CONVNETS[family](num_labels=3) if classifier else CONVNETS[family]()
    model = (AutoModelForImageClassification if classifier else AutoModel).from_config(config)
    with torch.no_grad():  # pretrained-looking values, not the stock init
        for param in model.parameters():
            param.normal_(0, 0.05)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[MEAN] * 3, image_std=[STD] * 3).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def chain(shards, tmp_path_factory):
    """A tiny ConvNeXt V2 run uninterrupted, the same run SIGKILLed at the end of KILL_STEP, and its rerun."""
    base = tmp_path_factory.mktemp("convnext_chain")
    _, killed = together(  # independent (two folders): both at once
        (run, [*PROBE, str(base / "p-straight"), *convnext_args(shards, base / "straight")]),
        (
            launch,
            [*PROBE, str(base / "p-killed"), *convnext_args(shards, base / "run")],
            {"SIMMIM_PROBE_KILL_AT_STEP": str(KILL_STEP)},
        ),
    )
    assert killed.returncode != 0 and not (base / "run" / "simmim_run.json").exists()
    resumed = run([*PROBE, str(base / "p-resumed"), *convnext_args(shards, base / "run")])
    return SimpleNamespace(
        base=base, resumed=resumed, checkpoint=base / "run" / f"checkpoint-{2 * ((KILL_STEP - 1) // 2)}"
    )


def test_killed_convnext_run_continues_the_uninterrupted_one_bitwise(chain):
    assert f"Resuming from {chain.checkpoint}" in chain.resumed.stderr
    straight, resumed = loss_curve(chain.base / "straight"), loss_curve(chain.base / "run")
    assert [step for step, _ in resumed] == list(range(1, MAX_STEPS + 1))
    assert resumed == straight and all(np.isfinite([loss for _, loss in straight]))
    weights = (chain.base / "p-straight" / "weights-rank0.txt").read_text()
    assert weights and weights == (chain.base / "p-resumed" / "weights-rank0.txt").read_text()


def test_record_and_card_state_the_masking_decoder_and_loss(chain):
    from huggingface_hub import ModelCard

    output = chain.base / "run"
    summary = json.loads((output / "simmim_run.json").read_text())
    assert (summary["backbone"], summary["conv_masking"], summary["decoder_type"]) == ("convnextv2", "sparse", "conv")
    assert (summary["loss_type"], summary["norm_target"]) == ("l2", True)
    card = " ".join(ModelCard.load(output / "README.md").text.split())  # prose lines joined
    assert "linear head" not in card
    assert "followed by a light convolutional decoder (1 ConvNeXt V2 block of width 16" in card
    assert "Masking: sparse: hidden patches zeroed at the input" in card
    assert "Loss: mean squared error to each hidden patch's pixels normalised by that patch's own mean" in card
    assert "| Masking (conv_masking) | sparse |" in card
    assert "| Decoder (decoder_type) | conv (1 block(s), width 16) |" in card
    assert "| Loss (loss_type) | l2, normalised per mask cell (norm_target) |" in card
    assert "features = hidden.mean(dim=(2, 3))" in card and "hidden.mean(dim=1)" not in card


def test_config_overrides_of_stages_and_widths_export_a_loadable_config(chain):
    encoder = chain.base / "run" / "encoder"
    config = json.loads((encoder / "config.json").read_text())
    assert (config["model_type"], config["depths"], config["hidden_sizes"]) == ("convnextv2", [1, 1, 1], [8, 16, 24])
    model, info = AutoModel.from_pretrained(encoder, output_loading_info=True)
    assert type(model).__name__ == "ConvNextV2Model" and not any(info.values()), info
    assert model.encoder.stages[2].layers[0].pwconv2.out_features == 24


def test_pipeline_extracts_the_exported_encoders_feature_map(chain):
    from transformers import pipeline

    encoder = chain.base / "run" / "encoder"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))  # greyscale
    features = torch.tensor(pipeline("image-feature-extraction", model=str(encoder), device="cpu")(image))
    model, processor = AutoModel.from_pretrained(encoder).eval(), ViTImageProcessor.from_pretrained(encoder)
    with torch.no_grad():
        expected = model(**processor(images=image.convert("RGB"), return_tensors="pt")).last_hidden_state
    assert features.shape == expected.shape == (1, 24, 4, 4)
    torch.testing.assert_close(features, expected)


def test_evaluate_script_probes_and_fine_tunes_a_convnet_run(chain, tmp_path):
    """kNN, linear probe and fine-tuning of the run folder through scripts/evaluate.py; results reach the card."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_script", Path("scripts/evaluate.py").resolve())
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    output = chain.base / "run"
    argv = ["--model", str(output), "--protocols", "knn,linear,finetune", "--train_samples", "40",
            "--eval_samples", "20", "--linear_epochs", "2", "--epochs", "1", "--batch_size", "16", "--device", "cpu",
            "--output", str(tmp_path / "eval.json")]  # fmt: skip
    script.main(argv)
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {row["protocol"] for row in results} == {"knn", "linear", "finetune"}
    assert all(0.0 <= row["value"] <= 1.0 for row in results)
    assert "| Fine-tuning | top-1 accuracy |" in (output / "README.md").read_text()


@pytest.fixture(scope="module")
def two_ranks(shards, tmp_path_factory):
    """Two CPU processes over gloo pretraining from a stock ConvNeXt classifier folder (`--init_encoder_from`)."""
    base = tmp_path_factory.mktemp("convnext_two_ranks")
    source = save_stock(base / "stock", "convnext", classifier=True)
    args = pretrain_args(shards, base / "run", 3, "--init_encoder_from", str(source), preset="convnextv2-demo",
                         overrides="decoder_hidden_size=16")  # fmt: skip
    run([*LAUNCH_TWO, PROBE_SCRIPT, str(base / "probe"), *args], CPU)
    return SimpleNamespace(base=base, source=source)


def test_two_rank_convnext_run_from_a_stock_classifier_finishes(two_ranks):
    probe, output = two_ranks.base / "probe", two_ranks.base / "run"
    assert (probe / "world-rank0.txt").read_text() == "2" == (probe / "world-rank1.txt").read_text()
    assert (probe / "weights-rank0.txt").read_text() == (probe / "weights-rank1.txt").read_text()
    summary = json.loads((output / "simmim_run.json").read_text())
    assert (summary["num_processes"], summary["global_batch_size"], summary["steps_completed"]) == (2, 32, 3)
    assert (summary["backbone"], summary["base_model"], summary["conv_masking"]) == (
        "convnext",
        str(two_ranks.source),
        "sparse",
    )
    assert type(AutoModel.from_pretrained(output / "encoder")).__name__ == "ConvNextModel"


@pytest.mark.parametrize("classifier", [False, True], ids=["bare", "classifier"])
@pytest.mark.parametrize("family", sorted(CONVNETS))
def test_init_encoder_from_a_stock_convnet_folder_keeps_every_tensor(tmp_path, family, classifier):
    """What `--init_encoder_from FOLDER` builds (`build_config` + `build_model`): the stock encoder's tensors."""
    folder = save_stock(tmp_path / family, family, classifier)
    model_args = ModelArguments(init_encoder_from=str(folder), config_overrides="decoder_hidden_size=16")
    config = build_config(model_args)
    assert (config.encoder_type, config.conv_masking, config.decoder_type, config.mask_patch_size) == (
        family,
        "sparse",
        "conv",
        8,
    )
    assert (config.image_mean, config.image_std) == ([MEAN] * 3, [STD] * 3)  # the folder's processor
    model = build_model(model_args, config)
    stock = AutoModel.from_pretrained(folder).state_dict()  # transformers' own loading of the encoder
    ours = model.simmim.encoder.state_dict()
    assert set(ours) == set(stock) and len(stock) > 20
    assert all(torch.equal(ours[key], stock[key]) for key in stock)


# -- frozen features and fine-tuning -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(CONVNETS))
def test_frozen_features_are_the_global_average_of_the_last_feature_map(tmp_path, family):
    import datasets

    from simmim_hf.eval.features import extract_features, load_encoder

    folder = save_stock(tmp_path / family, family, classifier=False)
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)) for _ in range(5)]
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    encoder = load_encoder(str(folder))
    last = extract_features(encoder, dataset, "image", batch_size=2)
    below = extract_features(encoder, dataset, "image", feature_layer=-2, batch_size=2)
    stock = AutoModel.from_pretrained(folder).eval()
    pixel_values = ViTImageProcessor.from_pretrained(folder)(images=[im.convert("RGB") for im in images],
                                                             return_tensors="pt")["pixel_values"]  # fmt: skip
    with torch.no_grad():
        outputs = stock(pixel_values, output_hidden_states=True)
    feature_map = outputs.last_hidden_state  # (N, C, h, w)
    assert feature_map.ndim == 4 and feature_map.shape[-1] >= 2
    expected = feature_map.sum(dim=(2, 3)) / (feature_map.shape[2] * feature_map.shape[3])
    torch.testing.assert_close(last, expected)
    hidden = outputs.hidden_states[-2]
    torch.testing.assert_close(below, hidden.sum(dim=(2, 3)) / (hidden.shape[2] * hidden.shape[3]))


@pytest.mark.parametrize(
    "family, name, layer_id",
    [
        # depths [1, 2, 1] (4 blocks): stem 0, stage 0 block 0 = 1, stage 1's downsampling with its first block = 2,
        # stage 1 block 1 = 3, stage 2 = 4, final norm and classifier = 5.
        ("convnextv2", "convnextv2.embeddings.patch_embeddings.weight", 0),
        ("convnextv2", "convnextv2.encoder.stages.0.layers.0.pwconv1.weight", 1),
        ("convnextv2", "convnextv2.encoder.stages.1.downsampling_layer.1.weight", 2),
        ("convnextv2", "convnextv2.encoder.stages.1.layers.1.dwconv.weight", 3),
        ("convnextv2", "convnextv2.encoder.stages.2.layers.0.grn.weight", 4),
        ("convnextv2", "classifier.weight", 5),
        # depths [2, 1] (3 blocks): the stem 0, each block (its shortcut included) i + 1, the classifier 4.
        ("resnet", "resnet.embedder.embedder.convolution.weight", 0),
        ("resnet", "resnet.encoder.stages.0.layers.1.layer.0.convolution.weight", 2),
        ("resnet", "resnet.encoder.stages.1.layers.0.shortcut.convolution.weight", 3),
        ("resnet", "classifier.1.weight", 4),
    ],
)
def test_fine_tuning_decays_the_learning_rate_per_block(tmp_path, family, name, layer_id):
    from transformers import TrainingArguments

    from simmim_hf.eval.finetune import LayerDecayTrainer

    model = AutoModelForImageClassification.from_config(CONVNETS[family](num_labels=3))
    num_layers = sum(model.config.depths)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-2, use_cpu=True, report_to="none")
    optimizer = LayerDecayTrainer(model=model, args=args, layer_decay=0.5).create_optimizer()
    (group,) = [group for group in optimizer.param_groups if name in group["names"]]
    assert group["lr"] == pytest.approx(1e-2 * 0.5 ** (num_layers + 1 - layer_id))
    exempt = name.endswith(".bias") or ".grn." in name
    assert group["weight_decay"] == (0.0 if exempt else args.weight_decay)


# -- mistakes: one line, exit 2, nothing written -----------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "demo", "--config_overrides", "conv_masking=sparse"],
         "error: conv_masking: applies to ConvNet encoders (convnext, convnextv2, resnet), not 'vit'"),
        (["--preset", "convnextv2-demo", "--mask_patch_size", "4"],
         "error: mask_patch_size=4 must be a multiple of the convnextv2 encoder's output stride 8"),
        (["--preset", "convnextv2-demo", "--image_size", "36"],
         "error: image_size 36 must be divisible by mask_patch_size=8"),
        (["--preset", "convnextv2-demo", "--config_overrides", "decoder_type=linear"],
         "error: decoder_type='linear' cannot reconstruct with conv_masking='sparse': a sparse encoder's features "
         "are exactly zero at masked positions"),
        (["--preset", "convnextv2-demo", "--gradient_checkpointing", "true"],
         "error: --activation_checkpointing (--gradient_checkpointing): transformers' convnextv2 encoder "
         "(ConvNextV2Model) has no gradient checkpointing (it has for vit, deit, beit, swin, swinv2 encoders)"),
        (["--init_encoder_from", "REGNET"],
         "error: --init_encoder_from REGNET: REGNET is a 'regnet' model; SimMIM continues pretraining from vit, deit, "
         "beit, swin, swinv2, convnext, convnextv2, resnet encoders"),
    ],
    ids=["conv_masking-on-vit", "mask-cell-vs-stride", "image-size", "linear-with-sparse", "gradient-checkpointing",
         "unsupported-type"],
)  # fmt: skip
def test_convnet_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    if "REGNET" in argv:
        from transformers import RegNetConfig, RegNetModel

        regnet = str(tmp_path / "regnet")
        RegNetModel(
            RegNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], groups_width=8)
        ).save_pretrained(regnet)
        argv, message = [regnet if arg == "REGNET" else arg for arg in argv], message.replace("REGNET", regnet)
    output = tmp_path / "run"
    status, stderr = run_script_in_process(
        "pretrain", [*argv, "--output_dir", str(output), "--max_steps", "2", "--report_to", "none"], capsys
    )
    assert status == 2
    assert stderr.count("\n") == 1 and stderr.startswith(message), stderr
    assert not output.exists()
