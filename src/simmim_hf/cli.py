"""Command-line helpers shared by the entry scripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of argument names to values."""
    text = Path(path).read_text()
    data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of argument names to values")
    return data


def config_to_argv(data: dict[str, Any]) -> list[str]:
    """{"max_steps": 10, "bf16": true, "data_files": ["a", "b"]} -> ["--max_steps", "10", "--bf16", "true", ...]."""
    argv: list[str] = []
    for key, value in data.items():
        if value is None:
            continue
        argv.append(f"--{key}")
        if isinstance(value, (list, tuple)):
            argv.extend(str(item) for item in value)
        elif isinstance(value, bool):
            argv.append("true" if value else "false")
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        else:
            argv.append(str(value))
    return argv


def expand_config_file(argv: list[str]) -> list[str]:
    """Replaces `--config FILE` (or `--config=FILE`) by the file's arguments, placed first so that explicit flags
    override them."""
    for index, item in enumerate(argv):
        if item.startswith("--config="):
            path, rest = item.split("=", 1)[1], argv[:index] + argv[index + 1 :]
            break
        if item == "--config":
            if index + 1 >= len(argv):
                raise ValueError("--config needs a file path")
            path, rest = argv[index + 1], argv[:index] + argv[index + 2 :]
            break
    else:
        return list(argv)
    return config_to_argv(load_config_file(path)) + list(rest)
