"""Continue SimMIM pretraining from a stock transformers encoder (issue 14), offline, on tiny stock folders."""

import json
import logging
import re
import sys

import pytest
import torch
from pretrain_helpers import TINY, pretrain_args, run
from test_auto_and_remote import run_python
from tiny_configs import tiny_beit, tiny_swin, tiny_vit
from transformers import AutoModel

from simmim_hf import SimMIMConfig, SimMIMForMaskedImageModeling
from simmim_hf.configuration_simmim import IMAGENET_MEAN
from simmim_hf.errors import UsageError
from simmim_hf.pretrain.arguments import ModelArguments
from simmim_hf.pretrain.run import build_config

PROCESSOR_MEAN, PROCESSOR_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
# name -> (stock class, config, has a mask token, saves an image processor)
SOURCES = {
    "vit": ("ViTModel", tiny_vit(), False, True),
    "vit_classifier": ("ViTForImageClassification", tiny_vit(num_labels=3), False, True),
    "swin": ("SwinModel", tiny_swin(), False, False),
    "beit": ("BeitModel", tiny_beit(use_mask_token=False), False, False),
    "beit_with_mask_token": ("BeitModel", tiny_beit(use_mask_token=True), True, False),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny stock model folders, written by a process that cannot import simmim_hf (as a user's or the Hub's)."""
    root = tmp_path_factory.mktemp("stock")
    specs = {name: (cls, config.to_json_string(), mask, proc) for name, (cls, config, mask, proc) in SOURCES.items()}
    (root / "specs.json").write_text(json.dumps(specs))
    run_python(f"""
        import json
        import torch
        import transformers
        from transformers import AutoConfig, RegNetConfig, RegNetModel, ViTImageProcessor
        root = {str(root)!r}
        for name, (cls, config, mask_token, processor) in json.load(open(root + "/specs.json")).items():
            config = json.loads(config)
            config = AutoConfig.for_model(config.pop("model_type"), **config)
            torch.manual_seed(0)
            model = getattr(transformers, cls)(config)
            with torch.no_grad():  # pretrained-looking values: not the stock init (a zero mask token, unit norms)
                for param in model.parameters():
                    param.normal_(0, 0.05)
            model.save_pretrained(root + "/" + name)
            if processor:
                ViTImageProcessor(image_mean={PROCESSOR_MEAN}, image_std={PROCESSOR_STD}).save_pretrained(
                    root + "/" + name
                )
        RegNetModel(RegNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], groups_width=8)).save_pretrained(
            root + "/regnet"
        )
        """)
    return root


@pytest.mark.parametrize("name", SOURCES)
def test_from_encoder_keeps_every_encoder_tensor(sources, name, caplog):
    _, source_config, has_mask_token, has_processor = SOURCES[name]
    with caplog.at_level(logging.INFO, logger="simmim_hf"):
        model = SimMIMForMaskedImageModeling.from_encoder(str(sources / name), mask_patch_size=8)
    source = AutoModel.from_pretrained(sources / name).state_dict()  # the encoder, transformers' own loading
    state = model.state_dict()
    compared = [key for key in source if not key.startswith("pooler.")]  # SimMIM's encoder has no pooler
    assert compared and all(torch.equal(state[f"simmim.encoder.{key}"], source[key]) for key in compared)
    new = set(state) - {f"simmim.encoder.{key}" for key in compared}
    token = "simmim.encoder.embeddings.mask_token"
    assert new == {"decoder.0.weight", "decoder.0.bias"} | (set() if has_mask_token else {token})
    if has_mask_token:
        assert torch.equal(state[token], source["embeddings.mask_token"])  # kept
    else:
        # Truncated normal, std 0.02 (stock encoders start at zero): a 4-sigma band for the sample std of n values.
        values = state[token].flatten()
        band = 0.02 * 4 / (2 * (values.numel() - 1)) ** 0.5
        assert 0.02 - band < values.std().item() < 0.02 + band and values.abs().max() < 0.2
    config = model.config
    assert (config.encoder_type, config.image_size, config.model_patch_size, config.num_channels) == (
        source_config.model_type,
        source_config.image_size,
        source_config.patch_size,
        source_config.num_channels,
    )
    assert config.image_mean == (PROCESSOR_MEAN if has_processor else IMAGENET_MEAN)
    if name == "vit_classifier":
        assert "classifier" in caplog.text  # the head that was dropped is named


def test_overrides_and_unsupported_types(sources):
    config = SimMIMConfig.from_encoder(str(sources / "swin"), mask_ratio=0.5, drop_path_rate=0.2, image_mean=[0.4] * 3)
    assert (config.mask_ratio, config.encoder_config.drop_path_rate, config.image_mean) == (0.5, 0.2, [0.4] * 3)
    with pytest.raises(ValueError, match=r"'regnet'.*vit, deit, beit, swin, swinv2, convnext"):
        SimMIMConfig.from_encoder(str(sources / "regnet"))
    with pytest.raises(UsageError, match="init_encoder_from.*model_name_or_path"):
        build_config(ModelArguments(init_encoder_from=str(sources / "vit"), model_name_or_path=str(sources / "vit")))
    with pytest.raises(UsageError, match="regnet"):
        build_config(ModelArguments(init_encoder_from=str(sources / "regnet")))


@pytest.mark.parametrize("name", ["vit_classifier", "beit"])
def test_pretrain_script_continues_from_a_stock_encoder(sources, shards, tmp_path, name):  # noqa: F811
    from huggingface_hub import ModelCard

    output = tmp_path / "run"
    args = pretrain_args(shards, output, 3, "--init_encoder_from", str(sources / name), "--mask_patch_size", "8")
    index = args.index("--config_overrides")
    assert args[index + 1] == TINY
    del args[index : index + 2]  # the architecture is the source's
    run([sys.executable, "scripts/pretrain.py", *args])
    summary = json.loads((output / "simmim_run.json").read_text())
    assert summary["base_model"] == str(sources / name) and summary["steps_completed"] == 3
    card = ModelCard.load(output / "README.md")
    # A local folder is named in the text, not as Hub `base_model` metadata (which would be read as a repo id).
    assert card.data.base_model is None and f"starting from the local checkpoint `{sources / name}`" in card.text
    processor = json.loads((output / "encoder" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == (PROCESSOR_MEAN if SOURCES[name][3] else IMAGENET_MEAN)
    out = run_python(f"""
        import json
        from transformers import AutoModel
        model, info = AutoModel.from_pretrained({str(output / "encoder")!r}, output_loading_info=True)
        print(json.dumps([type(model).__name__, {{k: list(map(str, v)) for k, v in info.items()}}]))
        """)
    class_name, info = json.loads(out.strip().splitlines()[-1])
    assert class_name == {"vit_classifier": "ViTModel", "beit": "BeitModel"}[name]
    assert not any(info.values()), info


class _Collect(logging.Handler):
    """What the transformers loading logger lets through to its handlers (what a user sees on the console)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def load_messages():
    report_logger = logging.getLogger("transformers.modeling_utils")
    handler = _Collect()
    report_logger.addHandler(handler)
    yield handler.messages
    report_logger.removeHandler(handler)


def test_expected_load_report_is_silent_and_a_surprise_is_reported(sources, load_messages, caplog):
    # A classifier checkpoint with no mask token: both expected, so transformers' LOAD REPORT is not shown ...
    SimMIMForMaskedImageModeling.from_encoder(str(sources / "vit_classifier"), mask_patch_size=8)
    assert not [m for m in load_messages if "LOAD REPORT" in m], load_messages
    # ... and its being held back does not hide a plain stock load's report afterwards.
    AutoModel.from_pretrained(sources / "vit_classifier")
    assert [m for m in load_messages if "LOAD REPORT" in m and "classifier.weight" in m]
    load_messages.clear()
    # Fewer blocks than the checkpoint has: block 1's tensors have no place; that is reported, by both.
    with caplog.at_level(logging.WARNING, logger="simmim_hf"):
        SimMIMForMaskedImageModeling.from_encoder(str(sources / "vit"), mask_patch_size=8, num_hidden_layers=1)
    reports = [m for m in load_messages if "LOAD REPORT" in m]
    block_1 = re.compile(r"(layers\.1|encoder\.layer\.1)\.attention")  # 5.2x in-memory names, or older ones
    assert len(reports) == 1 and block_1.search(reports[0]) and "mask_token" in reports[0]
    assert "have no place in the encoder" in caplog.text and block_1.search(caplog.text)
