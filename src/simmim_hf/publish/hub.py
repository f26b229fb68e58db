"""Publishing a pretraining run on the Hugging Face Hub: the encoder, its image processor and the SimMIM model card.

`push_run_to_hub(run_dir, repo_id)` makes exactly one commit holding, at the repository root, what a stock
`AutoModel.from_pretrained(repo)` / `AutoImageProcessor.from_pretrained(repo)` needs (the files of
`run_dir/encoder/`), the reconstruction, feature and curve pictures and the card; optionally the full SimMIM checkpoint under `simmim/`.
The token comes from `HF_TOKEN` or `hf auth login`; it is never printed, and every uploaded byte is scanned for it.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError
from transformers import HfArgumentParser

from simmim_hf.cli import CONFIG_SUFFIXES, parse_arguments
from simmim_hf.errors import HubPublishError
from simmim_hf.publish.model_card import render_model_card
from simmim_hf.publish.run_dir import RunDir, read_json, validate_run_dir

logger = logging.getLogger(__name__)

# Files of the full checkpoint worth publishing; optimizer states and trainer checkpoints stay local.
_FULL_CHECKPOINT_SUFFIXES = (".safetensors", ".py")
_FULL_CHECKPOINT_NAMES = ("config.json", "model.safetensors.index.json", "preprocessor_config.json")


def _collect_files(run_dir: Path, include_full_checkpoint: bool) -> list[tuple[str, Path]]:
    """(path in repo, local file) pairs, README excluded: encoder files at the root, then picture, then simmim/."""
    run = RunDir(run_dir)
    files = [
        (path.relative_to(run.encoder).as_posix(), path)
        for path in sorted(run.encoder.rglob("*"))
        if path.is_file() and path.name != RunDir.CARD_NAME and not path.name.startswith(".")
    ]
    for name, path in (
        (RunDir.RECONSTRUCTION_NAME, run.reconstruction),
        (RunDir.PCA_NAME, run.pca_picture),
        (RunDir.ATTENTION_NAME, run.attention_picture),
        (RunDir.CURVES_NAME, run.curves),
    ):
        if path.is_file():
            files.append((name, path))
    if include_full_checkpoint:
        for path in sorted(run.path.iterdir()):
            if path.is_file() and (path.name in _FULL_CHECKPOINT_NAMES or path.suffix in _FULL_CHECKPOINT_SUFFIXES):
                files.append((f"{RunDir.HUB_FULL_CHECKPOINT_DIR}/{path.name}", path))
    return files


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file holds `needle`; memory-mapped so multi-GB weights are not read into RAM."""
    if path.stat().st_size < len(needle):
        return False
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(needle) != -1


def _refuse_token_leaks(token: str, files: list[tuple[str, Path]], texts: dict[str, str]) -> None:
    needle = token.encode()
    leaked = [repo_path for repo_path, path in files if _contains(path, needle)]
    leaked += [name for name, text in texts.items() if token in text]
    if leaked:
        raise HubPublishError(
            f"refusing to push: your Hugging Face token appears in {', '.join(leaked)}. Remove it from these files "
            "(and revoke the token at https://huggingface.co/settings/tokens if it was ever shared)."
        )


def _resolve_repo_id(api: HfApi, repo_id: str, token: str) -> str:
    """Checks the token and that the user may write under the repo's namespace; returns `namespace/name`."""
    try:
        me = api.whoami(token=token)
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise HubPublishError(
                "the Hub rejected your token (401). Create a token with write access at "
                "https://huggingface.co/settings/tokens, then set HF_TOKEN or run `hf auth login`."
            ) from None
        raise
    user = me.get("name")
    orgs = [org.get("name") for org in me.get("orgs", []) if org.get("name")]
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    namespace = repo_id.split("/")[0]
    if namespace != user and namespace not in orgs:
        allowed = ", ".join([str(user), *orgs])
        raise HubPublishError(
            f"cannot push to {repo_id}: the namespace {namespace!r} is neither your user nor one of your "
            f"organizations ({allowed}). Use --repo_id {user}/{repo_id.split('/')[-1]} or an organization you "
            "belong to."
        )
    return repo_id


def _forbidden(error: HfHubHTTPError, repo_id: str) -> HubPublishError | None:
    status = error.response.status_code if error.response is not None else None
    if status == 403:
        return HubPublishError(
            f"the Hub refused to let you write to {repo_id} (403): the repository or its organization belongs to "
            "someone else, or your role/token lacks write access. Push to a namespace where you can write, or ask "
            "an admin for write access and use a token with the write scope."
        )
    return None


def push_run_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    include_full_checkpoint: bool = False,
    eval_results: str | os.PathLike | dict[str, Any] | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """Publishes a pretraining output to the Hub in one commit; returns the commit URL.

    Args:
        run_dir: the output_dir of scripts/pretrain.py.
        repo_id: `namespace/name` (or just `name`, pushed under your user); created when missing.
        private: create the repository as private (ignored when it exists).
        revision: branch to commit to (created from main when missing); default main.
        include_full_checkpoint: also upload the full SimMIM checkpoint under `simmim/`.
        eval_results: evaluation JSON of scripts/evaluate.py (path or dict), shown in the card and its model-index.
        token: Hub token; default `HF_TOKEN` or the token stored by `hf auth login`.
        commit_message: default describes the run.
        license: license id for the card metadata.
    """
    run_dir = validate_run_dir(run_dir, include_full_checkpoint=include_full_checkpoint)
    if isinstance(eval_results, (str, os.PathLike)):
        try:
            eval_results = read_json(eval_results)
        except (OSError, ValueError) as error:
            raise HubPublishError(f"cannot read the evaluation results: {error}") from None
    token = token or get_token()
    if not token:
        raise HubPublishError(
            "no Hugging Face token found. Set the HF_TOKEN environment variable or run `hf auth login` with a token "
            "that has write access (https://huggingface.co/settings/tokens)."
        )
    files = _collect_files(run_dir, include_full_checkpoint)
    _refuse_token_leaks(token, files, {})  # before any network traffic
    if constants.HF_HUB_OFFLINE:
        raise HubPublishError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (e.g. HF_HUB_OFFLINE=0).")
    api = HfApi(token=token)
    repo_id = _resolve_repo_id(api, repo_id, token)

    run = RunDir(run_dir).read_summary()
    try:
        card = render_model_card(
            run_dir,
            eval_results=eval_results,
            repo_id=repo_id,
            license=license,
            include_full_checkpoint=include_full_checkpoint,
        )
    except ValueError as error:  # a malformed evaluation JSON
        raise HubPublishError(f"cannot write the model card: {error}") from None
    commit_message = commit_message or (
        f"Upload SimMIM {run.get('backbone', 'encoder')} encoder"
        f" ({run.get('preset') or 'custom'} preset, {run.get('max_steps', '?')} steps)"
    )
    texts = {f"{RunDir.CARD_NAME} (model card)": str(card), "the commit message": commit_message}
    _refuse_token_leaks(token, [], texts)

    # The card goes last, so that it is the README of this commit whatever the Hub does with the other files.
    operations = [CommitOperationAdd(path_in_repo=repo_path, path_or_fileobj=str(path)) for repo_path, path in files]
    operations.append(CommitOperationAdd(path_in_repo=RunDir.CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except HfHubHTTPError as error:
        forbidden = _forbidden(error, repo_id)
        if forbidden is not None:
            raise forbidden from None
        raise
    logger.info("pushed %d files to %s", len(operations), repo_id)
    return info.commit_url


@dataclass
class PushArguments:
    """The arguments of scripts/push_to_hub.py (no token: command lines end up in shell histories)."""

    run_dir: str = field(metadata={"help": "output_dir of scripts/pretrain.py (may also be given first, unnamed)"})
    repo_id: str = field(metadata={"help": "namespace/name of the model repository; created when missing"})
    private: bool = field(default=False, metadata={"help": "create the repository as private"})
    revision: str | None = field(default=None, metadata={"help": "branch to push to (created from main if needed)"})
    include_full_checkpoint: bool = field(
        default=False, metadata={"help": "also upload the full SimMIM model under simmim/ (to resume pretraining)"}
    )
    eval_results: str | None = field(
        default=None, metadata={"help": "evaluation JSON of scripts/evaluate.py, shown in the card's model-index"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "license id for the model card"})
    commit_message: str | None = field(default=None, metadata={"help": "default describes the run"})


def parse_push_args(argv: list[str]) -> PushArguments:
    """Parses the push script's command line (or one YAML/JSON config file); the run folder may come first, unnamed."""
    parser = HfArgumentParser(PushArguments)
    config_file = len(argv) == 1 and argv[0].endswith(CONFIG_SUFFIXES) and Path(argv[0]).is_file()
    if argv and not argv[0].startswith("-") and not config_file:
        argv = ["--run_dir", *argv]  # the run folder may be given positionally, as in the README
    return parse_arguments(parser, argv)[0]


def main(argv: list[str] | None = None) -> int:
    """scripts/push_to_hub.py: parses `argv` (default `sys.argv[1:]`), pushes, prints the commit URL; returns the exit
    status (1, with the message and no traceback, for an expected failure: folder, token, permissions, server)."""
    args = parse_push_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("simmim_hf").setLevel(logging.INFO)
    try:
        url = push_run_to_hub(
            args.run_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            include_full_checkpoint=args.include_full_checkpoint,
            eval_results=args.eval_results,
            commit_message=args.commit_message,
            license=args.license,
        )
    except (HubPublishError, HfHubHTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"Pushed {args.run_dir} to {url}")
    return 0
