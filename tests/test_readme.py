"""The README is a front page that a newcomer can paste from: short, its links and files there, every pasted block
runnable in a new shell, what its commands write ignored by git, and every flag it lists a real one."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import HfArgumentParser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
RUNS_PYTHON = re.compile(r"^\s*(python|accelerate|tensorboard|hf)\b", re.M)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def test_the_readme_is_a_front_page_of_at_most_400_lines():
    assert len(README.splitlines()) <= 400


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
)
def test_links_and_named_files_exist(page):
    text = (ROOT / page).read_text()
    base = (ROOT / page).parent
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    missing = [
        link for link in links
        if link and not (base / link).exists()
    ]  # fmt: skip
    named = set(re.findall(r"\b((?:scripts|configs|benchmarks|tests)/[\w./-]+\.(?:py|sh|yaml|md))", text))
    missing += sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, missing


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
)
def test_every_pasted_block_works_in_a_new_shell(page):
    """A block that runs Python tools activates .venv first (or calls them through .venv/bin/)."""
    for block in _blocks((ROOT / page).read_text(), "bash"):
        first = RUNS_PYTHON.search(block)
        if first:
            before = block[: first.start()]
            assert "source .venv/bin/activate" in before, (
                f"{page}: block runs {first.group(1)!r} before activating .venv"
            )


def test_the_two_commands_are_the_ones_ci_runs():
    assert "bash scripts/demo.sh" in README and "bash scripts/run_tests.sh" in README
    assert "bash scripts/run_tests.sh" in (ROOT / ".ci" / "run").read_text()
    assert "configs/pretrain/demo.yaml" in (ROOT / "scripts" / "demo.sh").read_text()


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_what_the_readme_commands_write_is_ignored_by_git():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    for path in ("data/photos-src/astronaut-000.jpg", "data/photos/train-00000-of-00008.tar", "reconstruction.png",
                 "runs/demo/encoder/model.safetensors", ".venv/bin/python"):  # fmt: skip
        assert ignored(path), path
    assert not ignored("src/simmim_hf/data/new_module.py")  # the package's data/ is not the README's data/


def test_every_pretraining_argument_in_the_readme_exists():
    from simmim_hf.data.stream import DataArguments
    from simmim_hf.pretrain.arguments import ModelArguments, SimMIMTrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))
    known = {option for action in parser._actions for option in action.option_strings}
    table = README.split("Pretraining arguments beyond the Trainer's")[1].split("\n\n")[1]
    listed = set(re.findall(r"`(--[a-z_0-9]+)`", table))
    assert len(listed) > 20 and not listed - known, listed - known
