"""scripts/pretrain.py's command line: --help sections (ours first), no abbreviations, the learning-rate rule, the
Trainer flags it refuses, the attention kernels per encoder family; docs/cli.md's kernel table matches the code."""

import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pretrain_helpers import ROOT, TINY, launch

from simmim_hf.backbones import SUPPORTED_ENCODERS, attention_kernels
from simmim_hf.errors import UsageError
from simmim_hf.pretrain.arguments import SimMIMTrainingArguments, learning_rate_rule

PRETRAIN = [sys.executable, "scripts/pretrain.py"]
REFUSED = [
    (["--logging_nan_inf_filter", "true"], "--logging_nan_inf_filter"),
    (["--hub_strategy", "every_save"], "--hub_strategy every_save"),
    (["--ignore_data_skip", "true"], "--ignore_data_skip"),
    (["--attn_implementation", "flex_attention", "--preset", "swin-base-window6-192"], "swin"),
    (["--learning_rate", "-1"], "learning_rate"),
]


def refused_command(output: Path, flags: list[str]) -> list[str]:
    command = [*PRETRAIN, "--config_overrides", TINY, "--max_steps", "2", "--output_dir", str(output)]
    if "--preset" in flags:
        command.remove("--config_overrides"), command.remove(TINY)
    return [*command, *flags]


def abbreviated_command(output: Path) -> list[str]:
    return [*PRETRAIN, "--max_step", "10", "--output_dir", str(output)]


def kernel_command(output: Path) -> list[str]:
    return [*PRETRAIN, "--preset", "swin-base-window6-192", "--attn_implementation", "flash_attention_2",
            "--max_steps", "2", "--output_dir", str(output)]  # fmt: skip


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    """(test name, flags) -> (the output folder it names, the future of its finished scripts/pretrain.py process),
    for the selected tests of this module: independent processes that each mostly import torch and transformers, so
    they run two at a time from the first test on, and each test checks its own."""
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    pool = ThreadPoolExecutor(max_workers=2)
    started = {}

    def start(key, command_for):
        if key not in started:
            output = tmp_path_factory.mktemp("cli") / "run"
            started[key] = (output, pool.submit(launch, command_for(output)))

    for item in selected:
        if item.originalname == "test_help_lists_our_sections_before_the_stock_trainer_flags":
            start(("help",), lambda output: [*PRETRAIN, "--help"])
        elif item.originalname == "test_abbreviated_flags_are_an_error":
            start(("abbreviated",), abbreviated_command)
        elif item.originalname == "test_refused_flags_are_one_line_and_exit_2":
            flags = item.callspec.params["flags"]
            start(("refused", *flags), lambda output, flags=flags: refused_command(output, flags))
        elif item.originalname == "test_an_unsupported_kernel_names_the_family_and_its_kernels":
            start(("kernel",), kernel_command)
    yield {key: (output, future) for key, (output, future) in started.items()}
    pool.shutdown(wait=True, cancel_futures=True)


def finished(runs, *key):
    """(output folder, finished process) of the run `key` of `runs`."""
    output, future = runs[key]
    return output, future.result()


@pytest.fixture(scope="module")
def help_text(runs):
    result = finished(runs, "help")[1]
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_help_lists_our_sections_before_the_stock_trainer_flags(help_text):
    titles = [line.rstrip(":") for line in help_text.splitlines() if re.match(r"^[A-Za-z].*:$", line)]
    assert [t.split(" ")[0] for t in titles[1:]] == ["SimMIM", "SimMIM", "SimMIM", "transformers.TrainingArguments"]
    ours, stock = help_text.split("transformers.TrainingArguments (stock flags, unchanged):")
    ours = ours[ours.index("\nSimMIM model:") :]  # the sections, not the usage line
    assert "--base_learning_rate" in ours and "--mask_ratio" in ours and "--data_files" in ours
    assert "--learning_rate" in ours and "--learning_rate" not in stock  # changed defaults are ours
    assert "--per_device_train_batch_size" in stock and "--per_device_train_batch_size" not in ours
    learning_rate = ours[ours.index("--learning_rate") : ours.index("--base_learning_rate")]
    assert "5e-05" not in learning_rate and "linear-scaling rule" in learning_rate


def test_abbreviated_flags_are_an_error(runs):
    output, result = finished(runs, "abbreviated")
    assert result.args == abbreviated_command(output)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "--max_step" in result.stderr
    assert not output.exists()


def args(**given):
    return SimMIMTrainingArguments(output_dir="unused", use_cpu=True, report_to="none", **given)


def test_an_explicit_learning_rate_wins_over_the_scaling_rule():
    given = args(per_device_train_batch_size=16, learning_rate=0.001, base_learning_rate=1e-4)
    assert given.learning_rate == 0.001 and given.learning_rate_rule == "given"
    assert "--learning_rate, as given" in learning_rate_rule(given)
    scaled = args(per_device_train_batch_size=16, base_learning_rate=1e-4)
    assert scaled.learning_rate == pytest.approx(1e-4 * 16 / 512) and scaled.learning_rate_rule == "scaled"
    assert "linear scaling rule" in learning_rate_rule(scaled) and "x 16 / 512" in learning_rate_rule(scaled)


@pytest.mark.parametrize("flags, named", REFUSED)
def test_refused_flags_are_one_line_and_exit_2(runs, flags, named):
    output, result = finished(runs, "refused", *flags)
    assert result.args == refused_command(output, flags)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], result.stderr[-2000:]
    assert not output.exists()


def test_an_unsupported_kernel_names_the_family_and_its_kernels(runs):
    output, result = finished(runs, "kernel")
    assert result.args == kernel_command(output)
    assert result.returncode == 2
    assert f"runs {', '.join(attention_kernels('swin'))} only" in result.stderr


def test_kernels_are_what_the_stock_class_declares():
    from transformers import BeitModel, Swinv2Model, ViTModel

    expected = {
        "vit": ["eager"] + [k for k, f in (("sdpa", ViTModel._supports_sdpa),) if f],
        "swinv2": ["eager"] + (["sdpa"] if Swinv2Model._supports_sdpa else []),
        "beit": ["eager"] + (["sdpa"] if BeitModel._supports_sdpa else []),
    }
    for family, kernels in expected.items():
        assert list(attention_kernels(family))[: len(kernels)] == kernels
    assert ("flex_attention" in attention_kernels("beit")) == bool(BeitModel._supports_flex_attn)


def test_docs_kernel_table_matches_the_code():
    text = (Path(ROOT) / "docs" / "cli.md").read_text()
    for family in SUPPORTED_ENCODERS:
        row = re.search(rf"^\| `{re.escape(family)}` \| (.*?) \|$", text, re.MULTILINE)
        assert row, f"docs/cli.md has no kernel row for {family}"
        assert row.group(1) == ", ".join(f"`{k}`" for k in attention_kernels(family)), (
            f"docs/cli.md's {family} row is stale: regenerate it from backbones.attention_kernels"
        )


def test_usage_error_for_refused_flags_in_code():
    with pytest.raises(UsageError, match="logging_nan_inf_filter"):
        args(logging_nan_inf_filter=True)
