#!/usr/bin/env python
"""Runs the fault matrix and writes benchmarks/RELIABILITY.md: each fault injected into small real pretraining runs
(a tiny ViT, or the `demo` preset, on Fashion-MNIST shards, CPU), with what happened and the measured figures.

    python scripts/fault_matrix.py [--output benchmarks/RELIABILITY.md] [--workdir /tmp/faults] [--only kill,nan]

Every entry of FAULTS is a function taking the shared `Context` and returning a `Row(fault, outcome, figures)` or a
list of them (the data stream's faults, from scripts/fault_matrix_data.py; what clusters do, one entry per group of
scripts/fault_matrix_cluster.py). Runs go through tests/pretrain_probe.py, which injects the faults (SIGKILL, SIGTERM or
SIGINT at a step, SIGKILL, ENOSPC inside a checkpoint write, NaN losses) and records what each run restored.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

from fault_matrix_cluster import GROUPS  # noqa: E402
from pretrain_helpers import (  # noqa: E402
    LAUNCH_TWO,
    PROBE,
    PROBE_SCRIPT,
    folder_digest,
    launch,
    loss_curve,
    make_shards,
    pretrain_args,
    run,
)

from simmim_hf.publish.run_dir import RunDir  # noqa: E402

KILL_SEED = 8
MAX_STEPS = 8


@dataclass
class Row:
    fault: str
    outcome: str
    figures: str


@dataclass
class Context:
    workdir: Path
    shards: list[str]

    def folder(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path


def restored_tensors(probe: Path, checkpoint: Path, rank: int = 0) -> tuple[int, int, int, int]:
    """(model tensors equal bitwise, model tensors, optimizer tensors equal bitwise, optimizer tensors) between what
    a resumed run started from and the checkpoint it resumed."""
    import torch
    from safetensors.torch import load_file

    from simmim_hf.modeling_simmim import SimMIMForMaskedImageModeling

    restored = load_file(probe / f"resumed-model-rank{rank}.safetensors")
    expected = SimMIMForMaskedImageModeling.from_pretrained(checkpoint).state_dict()
    model_equal = sum(name in restored and torch.equal(restored[name], value) for name, value in expected.items())
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    loaded = torch.load(probe / f"resumed-optimizer-rank{rank}.pt", weights_only=True)["state"]
    pairs = [(loaded.get(i, {}).get(key), value) for i, state in saved.items() for key, value in state.items()]
    optim_equal = sum(mine is not None and torch.equal(mine, value) for mine, value in pairs)
    return model_equal, len(expected), optim_equal, len(pairs)


def max_loss_difference(first: Path, second: Path) -> float:
    a, b = loss_curve(first), loss_curve(second)
    return max(abs(x - y) for (_, x), (_, y) in zip(a, b, strict=True))


def kill_and_rerun(ctx: Context, ranks: int) -> Row:
    base = ctx.folder(f"kill-{ranks}")
    step = random.Random(KILL_SEED).randint(3, MAX_STEPS - 1)
    launcher = PROBE if ranks == 1 else [*LAUNCH_TWO, PROBE_SCRIPT]
    env = {"ACCELERATE_USE_CPU": "true"} if ranks > 1 else {}
    args = ("--save_steps", "2", "--dataloader_num_workers", "1")

    def command(probe: str, output: str) -> list[str]:
        return [*launcher, str(base / probe), *pretrain_args(ctx.shards, base / output, MAX_STEPS, *args)]

    run(command("p-straight", "straight"), env)
    killed = launch(command("p-killed", "run"), {**env, "SIMMIM_PROBE_KILL_AT_STEP": str(step)})
    resumed = run(command("p-resumed", "run"), env)
    checkpoint = base / "run" / f"checkpoint-{2 * ((step - 1) // 2)}"
    said = f"Resuming from {checkpoint}" in resumed.stderr
    figures = [f"killed at step {step} (exit {killed.returncode}), resumed from {checkpoint.name} (logged: {said})"]
    restored_all = said
    for rank in range(ranks):
        model_eq, model_n, optim_eq, optim_n = restored_tensors(base / "p-resumed", checkpoint, rank)
        restored_all = restored_all and model_eq == model_n and optim_eq == optim_n
        figures.append(f"rank {rank}: {model_eq}/{model_n} weight and {optim_eq}/{optim_n} optimizer tensors bitwise")
    difference = max_loss_difference(base / "straight", base / "run")
    same_weights = all(
        (base / "p-straight" / f"weights-rank{r}.txt").read_text()
        == (base / "p-resumed" / f"weights-rank{r}.txt").read_text()
        for r in range(ranks)
    )
    figures.append(f"max loss difference vs uninterrupted: {difference:.3g}")
    figures.append(f"final weights {'identical' if same_weights else 'differ'}")
    exact = difference == 0 and same_weights
    outcome = f"resumed (exit {resumed.returncode}); model and optimizer " + (
        "restored bitwise" if restored_all else "NOT restored exactly"
    )
    outcome += (
        "; loss of every step and final weights bitwise those of the uninterrupted run"
        if exact
        else ("; NOT the same run step by step")
    )
    return Row(f"SIGKILL at a seeded step, {ranks} rank{'s' if ranks > 1 else ''}, 1 DataLoader worker", outcome,
               "; ".join(figures))  # fmt: skip


def kill_one_rank(ctx: Context) -> Row:
    return kill_and_rerun(ctx, 1)


def kill_two_ranks(ctx: Context) -> Row:
    return kill_and_rerun(ctx, 2)


def kill_during_checkpoint_write(ctx: Context) -> Row:
    base = ctx.folder("kill-in-save")
    output = base / "run"
    command = [*PROBE, str(base / "probe"), *pretrain_args(ctx.shards, output, 6, "--save_steps", "2")]
    killed = launch(command, {"SIMMIM_PROBE_KILL_IN_SAVE": "4"})
    left = sorted(p.name for p in output.iterdir() if "checkpoint" in p.name)
    resumed = launch(command)
    passed_over = resumed.stderr.count("Not resuming from ")
    steps = RunDir(output).read_summary()["steps_completed"] if resumed.returncode == 0 else 0
    chosen = [
        line.split("Resuming from ")[1].split()[0] for line in resumed.stderr.splitlines() if "Resuming from " in line
    ]
    chosen_name = Path(chosen[0]).name if chosen else "nothing"
    ok = resumed.returncode == 0 and chosen_name == "checkpoint-2"
    outcome = "resumed from the last complete checkpoint" if ok else "FAILED: rerun did not resume from checkpoint-2"
    return Row(
        "SIGKILL while checkpoint-4 is written",
        outcome,
        f"left after the kill (exit {killed.returncode}): {', '.join(left)}; rerun exit {resumed.returncode}, "
        f"passed over {passed_over} incomplete folder(s), resumed from {chosen_name}, finished {steps}/6 steps",
    )


def forced_nan(ctx: Context) -> Row:
    base = ctx.folder("nan")
    output = base / "run"
    env = {"SIMMIM_PROBE_NAN_AT": "3,5,6,7", "SIMMIM_PROBE_DIGESTS": "1"}
    result = launch([*PROBE, str(base / "p"), *pretrain_args(ctx.shards, output, 10, "--save_steps", "2",
                                                             "--max_nonfinite_steps", "3")], env)  # fmt: skip
    lines = (base / "p" / "digests-rank0.txt").read_text().splitlines()
    digests = {int(line.split()[0]): line.split()[1:] for line in lines}
    error = next((line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line), "")
    exported = [
        path for path in (RunDir(output).encoder, RunDir(output).summary, RunDir(output).card) if path.exists()
    ]
    checkpoints = sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-"))
    return Row(
        "NaN loss at step 3, then at steps 5-7 (`--max_nonfinite_steps 3`)",
        f"step 3 skipped, training went on; stopped at step 7 with exit {result.returncode}",
        f"step 3 left weights and optimizer state {'unchanged' if digests[3] == digests[2] else 'CHANGED'}; "
        f"checkpoints kept: {', '.join(checkpoints)}; exported files: {len(exported)}; message: `{error[:90]}...`",
    )


def demo_learning_rate_1e3(ctx: Context) -> Row:
    base = ctx.folder("lr1e3")
    output = base / "run"
    args = pretrain_args(ctx.shards, output, 60)
    args = args[args.index("--dataset_name") :]  # the real demo preset: no tiny overrides
    args[args.index("--base_learning_rate") + 1] = "1e3"
    start = time.perf_counter()
    result = launch([sys.executable, "scripts/pretrain.py", "--preset", "demo", *args])
    skipped = result.stderr.count("optimizer step skipped")
    by_loss = result.stderr.count(": non-finite loss")
    error = next((line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line), "")
    logged = [line for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines() if "{'loss': " in line]
    losses = [line.split("'loss': ")[1].split(",")[0].strip("'\"") for line in logged]
    zero_losses = sum(float(loss) == 0.0 for loss in losses)
    return Row(
        "`--base_learning_rate 1e3`, demo preset",
        f"exit {result.returncode}; nothing exported" if not RunDir(output).encoder.exists() else "exported (!)",
        f"losses logged: {', '.join(losses[:5])}, ...; {sum(loss == 'nan' for loss in losses)} of {len(losses)} "
        f"logged as nan, {zero_losses} as 0; {skipped} steps skipped ({by_loss} for a non-finite loss, the rest for "
        f"the gradient norm); {time.perf_counter() - start:.0f} s; "
        f"message: `{error[:100]}...`",
    )


def rerun_finished(ctx: Context) -> Row:
    output = ctx.workdir / "kill-1" / "straight"
    if not output.is_dir():
        kill_one_rank(ctx)
    before = folder_digest(output)
    args = pretrain_args(ctx.shards, output, MAX_STEPS, "--save_steps", "2", "--dataloader_num_workers", "1")
    result = launch([sys.executable, "scripts/pretrain.py", *args])
    after = folder_digest(output)
    changed = sum(before.get(name) != after.get(name) for name in set(before) | set(after))
    return Row(
        "rerun of a finished run",
        f"exit {result.returncode}: `{result.stdout.strip().replace(str(output), 'DIR')[:60]}...`",
        f"{changed} of {len(before)} files changed",
    )


def launch_world_size_one(ctx: Context) -> Row:
    output = ctx.workdir / "launch" / "run"
    result = launch([*LAUNCH_TWO, "scripts/pretrain.py", *pretrain_args(ctx.shards, output, 2)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return Row(
        "`accelerate launch --multi_gpu --num_processes 2`, no GPU, no ACCELERATE_USE_CPU",
        f"launcher exit {result.returncode}, each process exit 2 with one line",
        f"{len(errors)} error lines; output folder created: {output.exists()}",
    )


def config_mistakes(ctx: Context) -> Row:
    folder = ctx.folder("config")
    results = []
    for content in ("max_stepz: 5\n", "max_steps: five\n"):
        config = folder / "run.yaml"
        config.write_text(content)
        result = launch([sys.executable, "scripts/pretrain.py", "--config", str(config), "--output_dir",
                         str(folder / "run")])  # fmt: skip
        results.append((result.returncode, result.stderr.strip().replace(str(folder), "DIR")))
    return Row(
        "unknown key / wrong type in a `--config` file",
        f"exit {', '.join(str(code) for code, _ in results)}; nothing written: {not (folder / 'run').exists()}",
        "; ".join(f"`{text}`" for _, text in results),
    )


def token_in_argument_error(ctx: Context) -> Row:
    token = "hf_" + "Z9y8X7w6" * 4
    result = launch([sys.executable, "scripts/push_to_hub.py", str(ctx.workdir), "--repo_id", "a/b",
                     "--hub_token", token])  # fmt: skip
    shown = token in result.stdout + result.stderr
    return Row(
        "`scripts/push_to_hub.py ... --hub_token hf_...` (no such flag)",
        f"exit {result.returncode}; token printed: {shown}",
        f"`{result.stderr.strip()[:120]}`",
    )


def resume_at_end_of_shards(ctx: Context) -> Row:
    """The reported case: 2,048 images in 4 shards, 2 ranks, batch 32, checkpoints at 20 and 40, then resumed to 50
    with the default shuffle buffer (10,000: larger than the data, so the saved position is at the end of the
    shards while the buffer still held images)."""
    base = ctx.folder("end-of-shards")
    shards = make_shards(base / "shards", num_shards=4, max_samples=2048)
    args = ("--per_device_train_batch_size", "32", "--save_steps", "20", "--shuffle_buffer_size", "10000",
            "--logging_steps", "10")  # fmt: skip
    env = {"ACCELERATE_USE_CPU": "true"}
    run([*LAUNCH_TWO, "scripts/pretrain.py", *pretrain_args(shards, base / "run", 40, *args)], env)
    resumed = launch([*LAUNCH_TWO, "scripts/pretrain.py", *pretrain_args(shards, base / "run", 50, *args)], env)
    summary = RunDir(base / "run").read_summary() if RunDir(base / "run").summary.is_file() else {}
    skipped = summary.get("images_skipped_at_resume")
    ok = resumed.returncode == 0 and skipped == 0
    outcome = "resumed, the buffered images re-read" if ok else f"FAILED: exit {resumed.returncode}, {skipped} skipped"
    return Row(
        "resume at the end of the shards with images still in the shuffle buffer (2 ranks, 2,048 images)",
        outcome,
        f"exit {resumed.returncode}; steps {summary.get('steps_completed')}/50; images skipped at the resume (summed "
        f"over ranks; the buffers' keys are saved): {skipped}",
    )


def cluster_rows(group: Callable[[Path, list[str]], list[dict[str, str]]]) -> Callable[[Context], list[Row]]:
    """One group of scripts/fault_matrix_cluster.py (what clusters do) as a FAULTS entry of the same name."""

    def rows(ctx: Context) -> list[Row]:
        return [Row(**row) for row in group(ctx.workdir, ctx.shards)]

    rows.__name__ = group.__name__
    return rows


def data_faults(ctx: Context) -> list[Row]:
    """The data stream's faults (scripts/fault_matrix_data.py): broken shards, bad images, bad paths."""
    from fault_matrix_data import run_data_faults

    return [Row(**row) for row in run_data_faults(ctx.folder("data"))]


FAULTS: list[Callable[[Context], Row | list[Row]]] = [
    kill_one_rank,
    kill_two_ranks,
    kill_during_checkpoint_write,
    forced_nan,
    demo_learning_rate_1e3,
    rerun_finished,
    launch_world_size_one,
    config_mistakes,
    token_in_argument_error,
    resume_at_end_of_shards,
    data_faults,
    *map(cluster_rows, GROUPS),
]


def _commit() -> str:
    """The tree measured: its short commit, and whether it had uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    if sha.returncode:
        return "unknown (not a git checkout)"
    return sha.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "")


def render(rows: list[Row], seconds: float) -> str:
    import torch
    import transformers

    lines = [
        "# Reliability: the fault matrix",
        "",
        "Measured by `python scripts/fault_matrix.py` (CPU, "
        f"{platform.machine()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{seconds:.0f} s in all). Each row injects one fault into small real runs (a tiny ViT, or the `demo` "
        "preset, on 256 Fashion-MNIST images in 4 shards, 8 steps unless said) and reports what a user sees.",
        "",
        f"Run on {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU core(s) at commit {_commit()}.",
        "",
        "| fault | outcome | figures |",
        "|---|---|---|",
    ]
    lines += [f"| {row.fault} | {row.outcome} | {row.figures.replace('|', '/')} |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "RELIABILITY.md"))
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--only", default="", help="comma-separated fault function names")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fault_matrix_"))
    from simmim_hf.data.fashion_mnist import ensure_fashion_mnist

    ensure_fashion_mnist()
    ctx = Context(workdir, make_shards(workdir / "shards"))
    chosen = [fault for fault in FAULTS if not args.only or fault.__name__ in args.only.split(",")]
    start, rows = time.perf_counter(), []
    for fault in chosen:
        began = time.perf_counter()
        try:
            result = fault(ctx)
            rows.extend(result if isinstance(result, list) else [result])
        except Exception as error:  # a row that could not be measured says so; the others still run
            rows.append(
                Row(fault.__name__, "not measured: the matrix itself failed", f"{type(error).__name__}: {error}")
            )
        print(f"{fault.__name__}: {rows[-1].outcome} ({time.perf_counter() - began:.0f} s)", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(render(rows, time.perf_counter() - start))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
