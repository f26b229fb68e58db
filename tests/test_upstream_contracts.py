"""Contracts with upstream internals: every private `Trainer` method `SimMIMTrainer` overrides, the callback event and
`TrainingArguments` method it relies on, the `HfArgumentParser` hooks of `sectioned_parser`, the `datasets` internals
of `data.stream.count_buffer_input` and the `argparse` internals of `cli`.

Each contract fails with a message naming the hook when the installed version no longer defines it, changes the
parameters we pass or accept, or (for the Trainer) stops calling it during ONE real tiny run shared by every spy
(a 2-step run with checkpoints, then a resume to step 3). `scripts/test_compat.sh` runs this file at both ends of
the supported transformers range.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from collections import defaultdict

import datasets
import pytest
import transformers
from pretrain_helpers import pretrain_args
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from simmim_hf.cli import parse_script_arguments
from simmim_hf.errors import UsageError
from simmim_hf.pretrain import callbacks, run
from simmim_hf.pretrain.trainer import SimMIMTrainer

VERSION = f"transformers {transformers.__version__}"

# Trainer methods SimMIMTrainer overrides (private ones first): the leading parameters (after self) our override
# accepts and passes on to `super()`, in order. `None`: the method may take more parameters after these.
TRAINER_HOOKS = {
    "_prepare_inputs": ["inputs"],
    "_load_from_checkpoint": ["resume_from_checkpoint", "model"],
    "_load_optimizer_and_scheduler": ["checkpoint"],
    "_clip_grad_norm": ["model"],
    "_maybe_log_save_evaluate": ["tr_loss", None],  # the rest passed through as *args, **kwargs
    "_get_output_dir": ["trial"],
    "_save_checkpoint": ["model", "trial"],
    "_push_from_checkpoint": ["checkpoint_folder"],
    "_save": ["output_dir", "state_dict"],
    "training_step": ["model", "inputs", None],
    "log": ["logs", "start_time"],
    "create_scheduler": ["num_training_steps", "optimizer"],
    "get_decay_parameter_names": ["model"],
    "get_train_dataloader": [],
}
# Called by the installed Trainer during the tiny run (every hook but `_push_from_checkpoint`, which needs a Hub).
CALLED_IN_RUN = [name for name in TRAINER_HOOKS if name != "_push_from_checkpoint"]


def check_parameters(owner: type, name: str, expected: list[str | None], where: str) -> None:
    """`owner.name` exists and its parameters after `self` start with `expected` (None: anything may follow)."""
    method = inspect.getattr_static(owner, name, None)
    assert method is not None, f"{where}: {owner.__name__}.{name} is gone ({VERSION}); {where} overrides or calls it"
    function = method.__func__ if isinstance(method, (staticmethod, classmethod)) else method
    names = [p for p in inspect.signature(function).parameters if p != "self"]
    fixed = [item for item in expected if item is not None]
    if None in expected:
        ok = names[: len(fixed)] == fixed
    else:
        ok = names == fixed
    assert ok, (
        f"{where}: {owner.__name__}.{name} now takes ({', '.join(names)}) in {VERSION}; "
        f"{where} passes/accepts ({', '.join(item or '...' for item in expected)})"
    )


@pytest.mark.parametrize("name", list(TRAINER_HOOKS))
def test_trainer_hook_is_defined_with_the_parameters_we_use(name):
    check_parameters(Trainer, name, TRAINER_HOOKS[name], f"SimMIMTrainer.{name}")
    assert name in vars(SimMIMTrainer), f"the test's table names {name}, which SimMIMTrainer no longer overrides"


def test_every_private_trainer_override_is_in_the_contract_table():
    private = {name for name in vars(SimMIMTrainer) if name.startswith("_") and not name.startswith("__")}
    upstream = {name for name in private if hasattr(Trainer, name)}
    assert upstream <= set(TRAINER_HOOKS), (
        f"overrides of Trainer internals without a contract: {upstream - set(TRAINER_HOOKS)}"
    )


def test_other_upstream_names_the_trainer_relies_on():
    check_parameters(TrainingArguments, "get_warmup_steps", ["num_training_steps"], "pretrain.arguments/trainer")
    check_parameters(TrainerCallback, "on_pre_optimizer_step", ["args", "state", "control", None], "NonFiniteGuard")
    source = inspect.getsource(Trainer)
    # `_maybe_log_save_evaluate` reads the step last logged; `create_scheduler` sets the flag the stock one sets;
    # upstream `_save_checkpoint` pushes through `_push_from_checkpoint` (ours pushes only once renamed).
    for attribute, where in (
        ("_globalstep_last_logged", "SimMIMTrainer._maybe_log_save_evaluate"),
        ("_created_lr_scheduler", "SimMIMTrainer.create_scheduler"),
        ("self._push_from_checkpoint(", "SimMIMTrainer._push_from_checkpoint"),
    ):
        assert attribute in source, f"{where}: Trainer no longer uses {attribute!r} ({VERSION})"


# -- one real tiny run, every spy ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spied_run(shards, tmp_path_factory):
    """{hook: [call facts]} over a 2-step run (checkpoints at 1, 2) and its resume to step 3, in this process."""
    calls: dict[str, list[dict]] = defaultdict(list)
    output = tmp_path_factory.mktemp("contract-run") / "run"

    def spy(name, original):
        def wrapper(self, *args, **kwargs):
            facts = {"args": args, "kwargs": kwargs, "staging": getattr(self, "_staging_dir", None) is not None}
            result = original(self, *args, **kwargs)
            facts["result"] = result
            facts["last_logged"] = getattr(self, "_globalstep_last_logged", "missing")
            calls[name].append(facts)
            return result

        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        for name in CALLED_IN_RUN:
            patch.setattr(SimMIMTrainer, name, spy(name, vars(SimMIMTrainer)[name]))
        guard = callbacks.NonFiniteGuard.on_pre_optimizer_step
        patch.setattr(callbacks.NonFiniteGuard, "on_pre_optimizer_step", spy("on_pre_optimizer_step", guard))
        for max_steps in (2, 3):
            calls["session"].append({"max_steps": max_steps})
            run.main(pretrain_args(shards, output, max_steps, "--save_steps", "1", "--save_total_limit", "3"))
    return calls


def calls_in(spied_run, name):
    return spied_run.get(name, [])


@pytest.mark.parametrize("name", CALLED_IN_RUN + ["on_pre_optimizer_step"])
def test_the_installed_trainer_calls_the_hook_during_a_run(spied_run, name):
    assert calls_in(spied_run, name), f"{VERSION} never called SimMIMTrainer.{name} during a 3-step run with a resume"


def test_the_hooks_are_called_the_way_the_overrides_expect(spied_run):
    prepared = calls_in(spied_run, "_prepare_inputs")
    assert all(isinstance(c["args"][0], dict) and "pixel_values" in c["args"][0] for c in prepared), (
        f"{VERSION}: Trainer._prepare_inputs no longer receives the batch dict"
    )
    loaded = calls_in(spied_run, "_load_from_checkpoint")
    assert any(str(c["args"][0]).endswith("checkpoint-2") for c in loaded), (
        f"{VERSION}: Trainer._load_from_checkpoint was not given the resumed checkpoint: {loaded}"
    )
    restored = [c["args"][0] for c in calls_in(spied_run, "_load_optimizer_and_scheduler")]
    assert any(arg is not None and str(arg).endswith("checkpoint-2") for arg in restored), (
        f"{VERSION}: Trainer._load_optimizer_and_scheduler was not given the resumed checkpoint: {restored}"
    )
    assert any(c["result"] is not None for c in calls_in(spied_run, "_clip_grad_norm")), (
        f"{VERSION}: Trainer._clip_grad_norm returns no norm (SimMIMTrainer._nonfinite_step reads it)"
    )
    # Upstream `_save_checkpoint` asks `_get_output_dir` while ours stages the checkpoint: that is what puts it
    # under `.tmp-checkpoint-N/`.
    assert any(c["staging"] for c in calls_in(spied_run, "_get_output_dir")), (
        f"{VERSION}: Trainer._save_checkpoint no longer calls _get_output_dir, so checkpoints bypass the staging folder"
    )
    steps = [c["args"][0] for c in calls_in(spied_run, "_save_checkpoint")]
    assert len(steps) >= 3, (
        f"{VERSION}: Trainer._save_checkpoint called {len(steps)} times for save_steps 1 over 3 steps"
    )
    logged = [c["last_logged"] for c in calls_in(spied_run, "_maybe_log_save_evaluate")]
    assert "missing" not in logged, f"{VERSION}: Trainer no longer sets _globalstep_last_logged"
    assert any(isinstance(c["args"][0], dict) and "loss" in c["args"][0] for c in calls_in(spied_run, "log")), (
        f"{VERSION}: Trainer.log never received the training loss"
    )


# -- HfArgumentParser (sectioned_parser) -----------------------------------------------------------------------------
def test_hf_argument_parser_hooks_of_the_sectioned_parser(monkeypatch):
    check_parameters(HfArgumentParser, "_add_dataclass_arguments", ["dtype"], "SectionedArgumentParser")
    check_parameters(HfArgumentParser, "_parse_dataclass_field", ["parser", "field"], "SectionedArgumentParser")
    from simmim_hf.sectioned_parser import SectionedArgumentParser

    @dataclasses.dataclass
    class Small:
        steps: int = 1

    seen = []
    original = SectionedArgumentParser._add_dataclass_arguments
    monkeypatch.setattr(
        SectionedArgumentParser,
        "_add_dataclass_arguments",
        lambda self, dtype: seen.append(dtype) or original(self, dtype),
    )
    (parsed,) = SectionedArgumentParser(Small).parse_args_into_dataclasses(args=["--steps", "4"])
    assert seen == [Small], f"{VERSION}: HfArgumentParser.__init__ no longer calls _add_dataclass_arguments"
    assert parsed.steps == 4


# -- datasets (data.stream.count_buffer_input) ---------------------------------------------------------------------
def test_datasets_shuffle_buffer_internals_count_every_example():
    from datasets.iterable_dataset import BufferShuffledExamplesIterable, MappedExamplesIterable

    from simmim_hf.data.faults import read_count
    from simmim_hf.data.stream import count_buffer_input

    where = "data.stream.count_buffer_input"
    version = f"datasets {datasets.__version__}"
    assert "max_buffer_input_shards" in inspect.signature(datasets.IterableDataset.shuffle).parameters, (
        f"data.stream.load_pretrain_dataset: IterableDataset.shuffle has no max_buffer_input_shards ({version})"
    )
    check_parameters(MappedExamplesIterable, "__init__", ["ex_iterable", "function", None], where)
    assert BufferShuffledExamplesIterable is not None

    def examples(shards):  # `datasets` hands each generator call a list of shards
        for shard in shards:
            for index in range(6):
                yield {"value": shard * 10 + index}

    stream = datasets.IterableDataset.from_generator(examples, gen_kwargs={"shards": [0, 1]})
    stream = stream.shuffle(seed=0, buffer_size=4, max_buffer_input_shards=1)
    key = "contract-test-buffer"
    assert count_buffer_input(stream, key), (
        f"{where}: {version} no longer has IterableDataset._ex_iterable as a buffer"
    )
    assert sorted(example["value"] for example in stream) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15]
    assert read_count(key) == 12, f"{where}: {version} counted {read_count(key)} of 12 examples entering the buffer"


# -- argparse (cli) --------------------------------------------------------------------------------------------------
def test_argparse_internals_of_cli(capsys, tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("source")
    assert isinstance(getattr(parser, "_option_string_actions", None), dict), (
        f"cli.check_config_keys: argparse {sys.version.split()[0]} has no ArgumentParser._option_string_actions"
    )
    assert [a.dest for a in getattr(parser, "_actions", []) if not a.option_strings] == ["source"], (
        "cli.positional_actions: argparse no longer lists positionals in ArgumentParser._actions"
    )
    assert "allow_abbrev" in inspect.signature(argparse.ArgumentParser).parameters
    config = tmp_path / "run.yaml"
    config.write_text("source: images\nmax_steps: 3\n")
    parsed = parse_script_arguments(parser, ["--config", str(config)])
    assert (parsed.source, parsed.max_steps) == ("images", 3)
    # cli replaces `parser.error` and turns abbreviations off on the parser argparse built: both must take effect.
    with pytest.raises(SystemExit) as stop:
        parse_script_arguments(parser, ["images", "--max_step", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--max_step" in err and err.endswith("(see --help)\n"), (
        f"cli._script_argv: argparse no longer reports through the replaced parser.error / allow_abbrev: {err!r}"
    )
    with pytest.raises(UsageError):
        parse_script_arguments(parser, ["--config", str(tmp_path / "missing.yaml")])
