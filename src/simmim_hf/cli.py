"""Command-line helpers shared by the entry scripts: `--config` files, one-line usage errors, token redaction.

`parse_arguments` (an `HfArgumentParser`) and `parse_script_arguments` (a plain `argparse` parser) are the one way
every script reads its command line and `--config FILE`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .errors import Preempted, RunFault, TrainingDiverged, UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# A flag that carries a secret (--hub_token, --token, --hub-token=...), and what a Hugging Face token looks like.
_SECRET_FLAG = re.compile(r"^--?[\w-]*token$", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of argument names to values; `UsageError` naming the file otherwise."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror or error})") from None
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"--config {path}: not valid {'JSON' if str(path).endswith('.json') else 'YAML'}: "
                         f"{first_line}") from None  # fmt: skip
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of argument names to values")
    return data


def check_config_keys(data: dict[str, Any], path: str | Path, parser: argparse.ArgumentParser) -> None:
    """Every key of a config file must be an argument of `parser` (a flag, or a positional argument by its name), and
    its value must convert to that argument's type (and be one of its choices): `UsageError` naming the file and the
    key otherwise."""
    actions = parser._option_string_actions  # argparse's own index of the flags it accepts
    positionals = positional_actions(parser)
    for key, value in data.items():
        action = actions.get(f"--{key}") or positionals.get(key)
        if action is None:
            raise UsageError(f"--config {path}: unknown key {key!r} (see --help for the arguments)")
        if value is None or action.nargs == 0:
            continue
        if isinstance(value, (list, tuple)) and action.nargs in (None, "?"):
            raise UsageError(f"--config {path}: {key}: expected a single value, got a list")
        for text in config_to_argv({key: value})[1:]:
            try:
                converted = action.type(text) if callable(action.type) else text
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                expected = getattr(action.type, "__name__", "value")
                raise UsageError(f"--config {path}: {key}: {value!r} is not a valid {expected}") from None
            if action.choices is not None and converted not in action.choices:
                choices = ", ".join(map(str, action.choices))
                raise UsageError(f"--config {path}: {key}: {value!r} is not one of {choices}")


def positional_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The positional arguments of `parser` by name, in command-line order (none for an `HfArgumentParser`)."""
    return {action.dest: action for action in parser._actions if not action.option_strings}


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


def expand_config_file(argv: list[str], parser: argparse.ArgumentParser | None = None) -> list[str]:
    """Replaces `--config FILE` (or `--config=FILE`) by the file's arguments, placed first so that explicit flags
    override them; with `parser`, the file's keys and values are checked against it first, and keys naming its
    positional arguments are given as bare values, in the parser's order."""
    for index, item in enumerate(argv):
        if item.startswith("--config="):
            path, rest = item.split("=", 1)[1], argv[:index] + argv[index + 1 :]
            break
        if item == "--config":
            if index + 1 >= len(argv):
                raise UsageError("--config needs a file path")
            path, rest = argv[index + 1], argv[:index] + argv[index + 2 :]
            break
    else:
        return list(argv)
    data = load_config_file(path)
    if parser is None:
        return config_to_argv(data) + list(rest)
    check_config_keys(data, path, parser)
    positionals = [name for name in positional_actions(parser) if name in data]
    bare = [value for name in positionals for value in config_to_argv({name: data[name]})[1:]]
    return bare + config_to_argv({key: value for key, value in data.items() if key not in positionals}) + list(rest)


def secrets_in(argv: list[str]) -> list[str]:
    """The values of token flags in `argv` (`--hub_token X`, `--token=X`) and of HF_TOKEN, to keep out of errors."""
    found = [os.environ.get("HF_TOKEN", "")]
    for index, item in enumerate(argv):
        flag, equals, value = item.partition("=")
        if _SECRET_FLAG.match(flag):
            found.append(value if equals else (argv[index + 1] if index + 1 < len(argv) else ""))
    return [secret for secret in found if len(secret) >= 4]


def redact(text: str, secrets: list[str] = ()) -> str:
    """`text` with every secret, and anything shaped like a Hugging Face token, replaced by `***`."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HF_TOKEN.sub("hf_***", text)


def parse_arguments(parser: Any, argv: list[str], positional_config: bool = True) -> tuple[Any, ...]:
    """`HfArgumentParser.parse_args_into_dataclasses` for an entry script: `--config FILE` (or, with
    `positional_config`, a lone YAML/JSON file) supplies arguments, and every input mistake (unknown or mistyped
    flag or key, invalid value) becomes a token-free `UsageError` or argparse's own exit 2."""
    secrets = secrets_in(argv)
    try:
        return parser.parse_args_into_dataclasses(args=_script_argv(parser, argv, positional_config, secrets))
    except ValueError as problem:  # unused arguments, or a dataclass's own validation
        raise UsageError(redact(str(problem), secrets)) from None


def parse_script_arguments(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """`parse_arguments` for a script with a plain `argparse` parser (`argv` None: the command line): the same
    `--config FILE` expansion and checks (keys may name positional arguments too), the same token-free errors."""
    argv = sys.argv[1:] if argv is None else list(argv)
    secrets = secrets_in(argv)
    try:
        return parser.parse_args(_script_argv(parser, argv, False, secrets))
    except ValueError as problem:
        raise UsageError(redact(str(problem), secrets)) from None


def _script_argv(parser: Any, argv: list[str], positional_config: bool, secrets: list[str]) -> list[str]:
    """`argv` with its config file expanded, and `parser`'s errors made token-free."""

    def error(message: str) -> None:  # argparse's errors quote the offending values: keep tokens out
        parser.exit(2, f"error: {redact(message, secrets)} (see --help)\n")

    parser.error = error
    parser.allow_abbrev = False  # `--max_step 10` is an error, not `--max_steps 10`
    if positional_config and len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        argv = ["--config", argv[0]]
    return expand_config_file(argv, parser)


def say_line(kind: str, message: str, secrets: list[str] = ()) -> None:
    """`kind: message` on stderr as ONE line in ONE write, token-free: the ranks of a launch share the stream, and
    `print` writes the text and its newline separately, so two ranks' lines could run into each other."""
    sys.stderr.flush()
    sys.stderr.write(f"{kind}: {' '.join(redact(message, secrets).split())}\n")
    sys.stderr.flush()


def run_script(main: Callable[[], Any]) -> None:
    """Runs an entry script's `main`: a `UsageError` is printed as one line, `error: ...`, and exits with status 2;
    a run stopped by `TrainingDiverged` or a `RunFault` exits with status 1 the same way. A run stopped by a signal
    (`Preempted`, after its checkpoint) prints one `stopped: ...` line and exits with its code (130 for Ctrl-C, else
    `--preemption_exit_code`); a Ctrl-C outside training is one line and 130 too, never a traceback. Tokens never
    reach the message."""
    secrets = secrets_in(sys.argv[1:])
    try:
        main()
    except UsageError as problem:
        say_line("error", str(problem), secrets)
        sys.exit(2)
    except (TrainingDiverged, RunFault) as problem:
        say_line("error", str(problem), secrets)
        sys.exit(1)
    except Preempted as stop:
        if stop.report:
            say_line("stopped", str(stop), secrets)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        # Training steps catch SIGINT themselves (`Preempted` above); this is Ctrl-C anywhere else, in any script.
        say_line("stopped", "interrupted (Ctrl-C); a rerun of the same command starts again (pretraining resumes "
                 "from its newest checkpoint)")  # fmt: skip
        sys.exit(130)


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`"hidden_size=256,depths=[2,2,6,2],drop_path_rate=0.1"` -> dict; values are JSON when they parse as JSON.
    Commas inside brackets belong to the value."""
    overrides: dict[str, Any] = {}
    for item in re.split(r",(?![^\[\]]*\])", text or ""):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"config_overrides: expected key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(value.strip())
    return overrides


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
