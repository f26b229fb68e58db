"""The run-folder contract (simmim_hf.publish.run_dir.RunDir): one home for every name in a pretraining output_dir.

A run folder is built through `RunDir` twice, once with the real names and once with every name changed, and the
readers (model card, Hub validation and file list, finished-run test, evaluation's encoder lookup) must find
everything either way; and no other module spells a run-folder name itself."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_configs import tiny_simmim_config

from simmim_hf import SimMIMForMaskedImageModeling, export_encoder
from simmim_hf.errors import NotARunDirError
from simmim_hf.eval.features import resolve_encoder_path
from simmim_hf.pretrain.checkpoints import finished_run
from simmim_hf.publish.hub import _collect_files
from simmim_hf.publish.model_card import render_model_card, write_model_card
from simmim_hf.publish.run_dir import RunDir, validate_run_dir

SRC = Path(__file__).resolve().parents[1] / "src" / "simmim_hf"
SUMMARY = {"backbone": "vit", "image_size": 32, "num_channels": 3, "max_steps": 3, "steps_completed": 3}
RENAMED = {
    "SUMMARY_NAME": "run_summary.json",
    "ENCODER_NAME": "stock_encoder",
    "RECONSTRUCTION_NAME": "preview.png",
    "CARD_NAME": "MODEL_CARD.md",
    "HUB_FULL_CHECKPOINT_DIR": "full",
}


@pytest.fixture(params=["names", "renamed"])
def run(request, monkeypatch, tmp_path) -> RunDir:
    """A finished tiny run (full checkpoint, encoder, summary, picture) written only through `RunDir`."""
    if request.param == "renamed":
        for attribute, name in RENAMED.items():
            monkeypatch.setattr(RunDir, attribute, name)
    run = RunDir(tmp_path / "run")
    torch.manual_seed(0)
    model = SimMIMForMaskedImageModeling(tiny_simmim_config("vit"))
    model.save_pretrained(run.path)
    export_encoder(model, run.encoder)
    run.summary.write_text(json.dumps(SUMMARY))
    Image.fromarray(np.zeros((32, 96, 3), dtype=np.uint8)).save(run.reconstruction)
    return run


def test_every_reader_finds_the_files_of_a_run_folder_under_any_names(run, tmp_path):
    assert validate_run_dir(run.path, include_full_checkpoint=True) == run.path
    assert run.read_summary() == SUMMARY and finished_run(run.path, 3) is None  # no card yet: not finished
    assert RunDir.containing(run.path) == run and RunDir.containing(run.encoder) == run
    assert RunDir.containing(tmp_path) is None
    assert resolve_encoder_path(str(run.path), tmp_path / "work") == str(run.encoder)

    card = render_model_card(run.path)
    assert f"]({RunDir.RECONSTRUCTION_NAME})" in card.text and str(run.encoder) in card.text
    assert write_model_card(run.path) == run.card and run.card.is_file()
    assert finished_run(run.path, 3) == SUMMARY and not list(run.path.glob(".*tmp-*"))

    files = dict(_collect_files(run.path, include_full_checkpoint=True))
    assert files[RunDir.RECONSTRUCTION_NAME] == run.reconstruction
    for name in ("config.json", "model.safetensors", *RunDir.ENCODER_REQUIRED_FILES):
        assert files[name] == run.encoder / name  # the encoder at the root of the Hub repository
    assert files[f"{RunDir.HUB_FULL_CHECKPOINT_DIR}/config.json"] == run.full_config
    assert RunDir.CARD_NAME not in files  # the card is rendered for the commit, not copied


def test_validation_names_missing_files_by_their_contract_names(run):
    run.summary.unlink()
    (run.encoder / "preprocessor_config.json").unlink()
    missing = rf"{RunDir.SUMMARY_NAME}.*{RunDir.ENCODER_NAME}/preprocessor_config\.json"
    with pytest.raises(NotARunDirError, match=missing):
        validate_run_dir(run.path)


def test_checkpoint_files_are_named_by_rank_inside_the_checkpoint(tmp_path):
    assert RunDir.stream_state_file(tmp_path, 3) == tmp_path / "stream_state_rank3.json"
    assert RunDir.wall_time_file(tmp_path) == tmp_path / "simmim_wall_time.json"


def _spelled_names(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every run-folder file name written as a literal, and of every `path / "encoder"`."""
    files = {RunDir.SUMMARY_NAME, RunDir.RECONSTRUCTION_NAME, RunDir.CARD_NAME, RunDir.WALL_TIME_NAME}
    files.add(RunDir.SETTINGS_NAME)
    files.add(RunDir.STREAM_STATE_NAME)
    found = [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)]
    found = [(line, value) for line, value in found if value in files]
    joins = [node for node in ast.walk(tree) if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)]
    found += [
        (node.lineno, node.right.value)
        for node in joins
        if isinstance(node.right, ast.Constant) and node.right.value == RunDir.ENCODER_NAME
    ]
    return found


def test_no_module_but_run_dir_spells_a_run_folder_name():
    spelled = {
        str(path.relative_to(SRC)): found
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "run_dir.py" and (found := _spelled_names(ast.parse(path.read_text())))
    }
    assert spelled == {}
