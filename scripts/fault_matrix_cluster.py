"""What clusters do, for the fault matrix: preemption signals, corrupt checkpoints, two jobs on one folder, a changed
corpus or changed settings, a kill in the finish, a full disk, launch mistakes, odd images, a resume with a shuffle
buffer (issue 22's table). Each group function takes the work folder and the 256-image shards and returns rows
(`{"fault", "outcome", "figures"}`), every figure measured from real subprocess runs of scripts/pretrain.py or
tests/pretrain_probe.py (a tiny ViT, CPU); the faults are injected as the tests inject them (the probe's
SIMMIM_PROBE_* variables, files edited as in tests/test_checkpoint_integrity.py).

    from fault_matrix_cluster import GROUPS
    rows = [row for group in GROUPS for row in group(workdir, shards)]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from pretrain_helpers import (
    LAUNCH_TWO,
    PROBE,
    PROBE_SCRIPT,
    ROOT,
    cut,
    launch,
    loss_curve,
    nan_bytes,
    pretrain_args,
    read_batches,
    run,
    xor_64_bytes,
)

from simmim_hf.publish.run_dir import RunDir

MAX_STEPS = 8
STOPS = sorted(random.Random(22).sample(range(2, MAX_STEPS), 2))  # seeded: SIGTERM, then SIGINT after it
CPU = {"ACCELERATE_USE_CPU": "true"}
Rows = list[dict[str, str]]


def row(fault: str, outcome: str, figures: str) -> dict[str, str]:
    return {"fault": fault, "outcome": outcome, "figures": figures}


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def lines_with(text: str, marker: str) -> list[str]:
    """The lines of `text` holding `marker`, from the marker on (log prefixes cut off)."""
    return [line[line.index(marker) :] for line in text.splitlines() if marker in line]


def first(text: str, marker: str, root: Path | None = None) -> str:
    found = lines_with(text, marker)
    shown = found[0] if found else f"(no line with {marker.strip()!r})"
    return shown.replace(str(root), "DIR") if root else shown


def resumed_from(stderr: str) -> str:
    found = lines_with(stderr, "Resuming from ")
    return Path(found[0].split("Resuming from ", 1)[1].split()[0]).name if found else "nothing"


def exit_codes(probe: Path, ranks: int) -> list[str]:
    return [
        (probe / f"exit-rank{r}.txt").read_text() if (probe / f"exit-rank{r}.txt").exists() else "?"
        for r in range(ranks)
    ]


def weights(probe: Path, rank: int = 0) -> str:
    path = probe / f"weights-rank{rank}.txt"
    return path.read_text() if path.exists() else ""


def bitwise(reference: tuple[Path, Path], rerun: tuple[Path, Path], ranks: int = 1) -> tuple[bool, str]:
    """(loss of every step and final weights of every rank equal, the figures) between (output, probe) folders."""
    straight, resumed = loss_curve(reference[0]), loss_curve(rerun[0])
    same_loss = straight == resumed
    same_weights = all(weights(reference[1], r) and weights(reference[1], r) == weights(rerun[1], r)
                       for r in range(ranks))  # fmt: skip
    differing = sum(a != b for a, b in zip(straight, resumed, strict=False)) + abs(len(straight) - len(resumed))
    figures = (f"loss {'equal bitwise' if same_loss else f'differs at {differing} steps'} at all {len(straight)} "
               f"steps, final weights {'identical' if same_weights else 'DIFFER'} vs uninterrupted")  # fmt: skip
    return same_loss and same_weights, figures


def one_rank(shards: list[str], output: Path, probe: Path, steps: int = MAX_STEPS, *extra: str) -> list[str]:
    return [*PROBE, str(probe), *pretrain_args(shards, output, steps, *extra)]


def uninterrupted(workdir: Path, shards: list[str]) -> tuple[Path, Path]:
    """The 8-step 1-rank run every 1-rank chain is compared with (made once): (output, probe)."""
    base = workdir / "cluster-straight"
    if not RunDir(base / "run").summary.is_file():
        fresh(base)
        run(one_rank(shards, base / "run", base / "probe"))
    return base / "run", base / "probe"


def copy_finished(workdir: Path, shards: list[str], name: str) -> Path:
    output = fresh(workdir / name) / "run"
    shutil.copytree(uninterrupted(workdir, shards)[0], output)
    return output


# -- preemption ----------------------------------------------------------------------------------------------------
def preemption_one_rank(workdir: Path, shards: list[str]) -> Rows:
    """SIGTERM at STOPS[0], SIGINT at STOPS[1] on the rerun, then the finish: one chain on one folder."""
    reference = uninterrupted(workdir, shards)
    base = fresh(workdir / "cluster-preempt-1")
    output = base / "run"
    term = launch(one_rank(shards, output, base / "p-term"), {"SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[0]}:SIGTERM"})
    interrupt = launch(one_rank(shards, output, base / "p-int"), {"SIMMIM_PROBE_SIGNAL_AT_STEP": f"{STOPS[1]}:SIGINT"})
    finish = launch(one_rank(shards, output, base / "p-finish"))
    exact, figures = bitwise(reference, (output, base / "p-finish"))
    rows = []
    for name, result, step, code, rerun in (("SIGTERM", term, STOPS[0], 143, interrupt),
                                             ("SIGINT (Ctrl-C)", interrupt, STOPS[1], 130, finish)):  # fmt: skip
        checkpoint = output / f"checkpoint-{step}"
        saved = (checkpoint / "trainer_state.json").is_file() and json.loads(
            (checkpoint / "trainer_state.json").read_text()
        )["global_step"] == step
        stopped = lines_with(result.stderr, "stopped: ")
        ok = result.returncode == code and saved and len(stopped) == 1 and "Traceback" not in result.stderr
        outcome = (f"{'stopped after the step with its checkpoint' if ok else 'FAILED'}, exit {result.returncode}; "
                   f"the rerun {'continued the uninterrupted run bitwise' if exact else 'is NOT the same run'}")  # fmt: skip
        rows.append(row(
            f"{name} during step {step} of {MAX_STEPS}, 1 rank",
            outcome,
            f"checkpoint-{step} complete: {saved}; `{first(result.stderr, 'stopped: ', output)}`; tracebacks: "
            f"{result.stderr.count('Traceback')}; next run (exit {rerun.returncode}) resumed from "
            f"{resumed_from(rerun.stderr)}; chain end: {figures}",
        ))  # fmt: skip
    return rows


def preemption_two_ranks(workdir: Path, shards: list[str]) -> Rows:
    """2 ranks, one chain on one folder: SIGTERM to `accelerate launch` (it forwards it to both ranks) during
    STOPS[0], SIGTERM to rank 1 only during STOPS[1], then the finish, compared with an uninterrupted 2-rank run."""
    base = fresh(workdir / "cluster-preempt-2")

    def command(probe: str, output: Path) -> list[str]:
        return [*LAUNCH_TWO, PROBE_SCRIPT, str(base / probe), *pretrain_args(shards, output, MAX_STEPS)]

    output = base / "run"
    run(command("p-straight", base / "straight"), CPU)
    signals = {"p-launcher": f"{STOPS[0]}:SIGTERM:0:launcher", "p-rank1": f"{STOPS[1]}:SIGTERM:1"}
    stops = {probe: launch(command(probe, output), {**CPU, "SIMMIM_PROBE_SIGNAL_AT_STEP": plan})
             for probe, plan in signals.items()}  # fmt: skip
    finish = launch(command("p-finish", output), CPU)
    exact, figures = bitwise((base / "straight", base / "p-straight"), (output, base / "p-finish"), ranks=2)
    rows, reruns = [], [stops["p-rank1"], finish]
    for (probe, result), step, rerun, whom in zip(stops.items(), STOPS, reruns, ("`accelerate launch`", "rank 1 only"),
                                                   strict=True):  # fmt: skip
        codes = exit_codes(base / probe, 2)
        saved = (output / f"checkpoint-{step}" / "trainer_state.json").is_file()
        ok = codes == ["143", "143"] and saved and len(lines_with(result.stderr, "stopped: ")) == 1
        rows.append(row(
            f"SIGTERM to {whom} (2 ranks) during step {step} of {MAX_STEPS}",
            f"{'both ranks stopped after the step with its checkpoint' if ok else 'FAILED'}; the rerun "
            f"{'continued the uninterrupted run bitwise' if exact else 'is NOT the same run'}",
            f"launcher exit {result.returncode}, rank exits {', '.join(codes)}; checkpoint-{step} written: {saved}; "
            f"`stopped:` lines: {len(lines_with(result.stderr, 'stopped: '))}, "
            f"`{first(result.stderr, 'stopped: ', output)}`; next run (exit {rerun.returncode}) resumed from "
            f"{resumed_from(rerun.stderr)}; chain end: {figures} (both ranks)",
        ))  # fmt: skip
    return rows


# -- checkpoints: corruption, a full disk, two jobs ---------------------------------------------------------------
CKPT_STEPS, FULL_AT = 6, 6  # one checkpoint per step; the disk is full while checkpoint 6 is written


def nan_bytes_resealed(folder: Path) -> None:
    """NaN bytes with the manifest written again to match: only the finiteness check can catch it."""
    from simmim_hf.pretrain.manifest import seal_checkpoint

    nan_bytes(folder)
    seal_checkpoint(folder)


CORRUPTIONS = {
    "64 bytes XORed in the newest checkpoint's model.safetensors": xor_64_bytes,
    "the newest checkpoint's weights truncated to 0 bytes": cut("model.safetensors", 0),
    "NaN bytes in the newest checkpoint's weights": nan_bytes,
    "NaN bytes in the newest checkpoint's weights, its manifest resealed to match": nan_bytes_resealed,
    "the newest checkpoint's optimizer.pt cut in half": cut("optimizer.pt", 0.5),
}


def checkpoints(workdir: Path, shards: list[str]) -> Rows:
    base = fresh(workdir / "cluster-ckpt")

    def command(output: Path, probe: str) -> list[str]:
        return one_rank(shards, output, base / probe, CKPT_STEPS, "--save_steps", "1")

    # Two jobs on one folder: A pauses at step 3 until B (the same command, another seed) has been refused.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "SIMMIM_PROBE_PAUSE_AT_STEP": "3"}
    first_job = subprocess.Popen(command(base / "shared", "a"), cwd=ROOT, env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (base / "a" / "paused-rank0").exists() and time.monotonic() < deadline and first_job.poll() is None:
        time.sleep(0.1)
    before = sorted(p.name for p in (base / "shared").iterdir())
    second = launch([*command(base / "shared", "b"), "--seed", "1"])
    after = sorted(p.name for p in (base / "shared").iterdir())
    (base / "a" / "go").touch()
    out, err = first_job.communicate(timeout=600)
    errors = lines_with(second.stderr, "error: ")
    summary = RunDir(base / "shared").read_summary() if RunDir(base / "shared").summary.is_file() else {}
    ok = second.returncode == 2 and len(errors) == 1 and first_job.returncode == 0 and before == after
    rows = [row(
        "two jobs on one `--output_dir` (the second, seed 1, started while the first trains)",
        f"{'the second stopped at start, the first finished untouched' if ok else 'FAILED'}",
        f"second: exit {second.returncode}, {len(errors)} line: `{first(second.stderr, 'error: ', base)[:230]}`; "
        f"folder unchanged by it: {before == after}; first: exit {first_job.returncode}, "
        f"{summary.get('steps_completed')}/{CKPT_STEPS} steps, seed {summary.get('seed')}",
    )]  # fmt: skip

    full = launch(command(base / "full", "p-full"), {"SIMMIM_PROBE_ENOSPC_IN_SAVE": str(FULL_AT)})
    from simmim_hf.pretrain.manifest import verify_checkpoint

    last = base / "full" / f"checkpoint-{FULL_AT - 1}"
    intact = last.is_dir() and verify_checkpoint(last) is None
    errors = lines_with(full.stderr, "error: ")
    ok = (
        full.returncode == 1 and len(errors) == 1 and intact and not (base / "full" / f"checkpoint-{FULL_AT}").exists()
    )
    rows.append(row(
        f"ENOSPC while checkpoint-{FULL_AT} is written (injected by the probe)",
        "one line, the previous checkpoint intact" if ok else "FAILED",
        f"exit {full.returncode}; {len(errors)} line: `{first(full.stderr, 'error: ', base)[:230]}`; "
        f"{last.name} verifies: {intact}; tracebacks: {full.stderr.count('Traceback')}",
    ))  # fmt: skip

    reference = (base / "shared", base / "a")  # the uninterrupted run of the same command
    for index, (fault, corrupt) in enumerate(CORRUPTIONS.items()):
        output = base / f"corrupt-{index}"
        shutil.copytree(base / "full", output)
        corrupt(output / f"checkpoint-{FULL_AT - 1}")
        rerun = launch(command(output, f"p-corrupt-{index}"))
        exact, figures = bitwise(reference, (output, base / f"p-corrupt-{index}"))
        passed = lines_with(rerun.stderr, "Not resuming from ")
        ok = rerun.returncode == 0 and len(passed) == 1 and resumed_from(rerun.stderr) == f"checkpoint-{FULL_AT - 2}"
        rows.append(row(
            f"{fault}, rerun",
            f"{'fell back to the older checkpoint' if ok else 'FAILED'}, exit {rerun.returncode}",
            f"resumed from {resumed_from(rerun.stderr)}; `{first(rerun.stderr, 'Not resuming from ', base)[:150]}`; "
            f"{figures}",
        ))  # fmt: skip
    return rows


# -- a changed corpus, changed settings, a raised max_steps, a kill in the finish --------------------------------
def changed_runs(workdir: Path, shards: list[str]) -> Rows:
    base = fresh(workdir / "cluster-changed")
    rows = []
    extra = base / "extra-shard.tar"
    shutil.copy(shards[0], extra)
    for fault, files, stream_line in (("a shard added to `--data_files`", [*shards, str(extra)], "new shard(s)"),
                                      ("a shard removed from `--data_files`", shards[:3], "gone or changed size")):  # fmt: skip
        output = copy_finished(workdir, shards, f"cluster-changed-{len(files)}")
        result = launch(one_rank(files, output, base / f"p-{len(files)}", 12))
        summary = RunDir(output).read_summary() if RunDir(output).summary.is_file() else {}
        logged = [first(result.stderr, "data_files changed", workdir), first(result.stderr, stream_line, workdir)]
        ok = result.returncode == 0 and "(no line" not in logged[0] + logged[1]
        rows.append(row(
            f"{fault} between runs (8 steps, half a pass, done), resumed to 12 steps",
            f"{'resumed, the change logged' if ok else 'FAILED'}, exit {result.returncode}",
            f"steps {summary.get('steps_completed')}/12, images skipped at resume "
            f"{summary.get('images_skipped_at_resume')}; logged: `{logged[0][:150]}`; `{logged[1][:200]}`; "
            f"tracebacks: {result.stderr.count('Traceback')}",
        ))  # fmt: skip

    output = copy_finished(workdir, shards, "cluster-changed-settings")
    before = sorted(str(p) for p in output.rglob("*"))
    refused = launch(one_rank(shards, output, base / "p-refused", 12, "--mask_ratio", "0.4"))
    unchanged = before == sorted(str(p) for p in output.rglob("*"))
    allowed = launch(one_rank(shards, output, base / "p-allowed", 12, "--mask_ratio", "0.4",
                              "--per_device_train_batch_size", "8", "--allow_changed_settings", "true"))  # fmt: skip
    summary = RunDir(output).read_summary() if RunDir(output).summary.is_file() else {}
    expected = MAX_STEPS * 16 + 4 * 8
    ok = refused.returncode == 2 and unchanged and allowed.returncode == 0 and summary.get("images_seen") == expected
    rows.append(row(
        "resume with `--mask_ratio 0.4` (was 0.6); then with `--allow_changed_settings true` and batch 8 (was 16)",
        "refused with one line; allowed, recorded as a segment" if ok else "FAILED",
        f"refused: exit {refused.returncode}, `{first(refused.stderr, 'error: ', output)[:260]}`, folder unchanged: "
        f"{unchanged}; allowed: exit {allowed.returncode}, images_seen {summary.get('images_seen')} "
        f"(8 x 16 + 4 x 8 = {expected}), segments {len(summary.get('settings_segments', []))}",
    ))  # fmt: skip

    output = copy_finished(workdir, shards, "cluster-changed-max-steps")
    raised = launch(one_rank(shards, output, base / "p-raised", 12))
    rows.append(row(
        f"`--max_steps 12` after finishing at {MAX_STEPS}",
        f"resumed, the header says how the schedule changes, exit {raised.returncode}",
        f"`{first(raised.stderr, 'schedule resuming', output)[:200]}`",
    ))  # fmt: skip
    rows += [finish_kill(workdir, shards, base, where) for where in FINISH_KILLS]
    return rows


FINISH_KILLS = {  # where the finish is killed: (module, function), what is written by then
    "the reconstruction picture": ("simmim_hf.pretrain.run", "save_reconstruction_grid"),
    "the model card": ("simmim_hf.publish.model_card", "write_atomic"),
}
KILLER = """import os, signal, sys
sys.path.insert(0, "scripts")
import {module} as target
target.{name} = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
import pretrain
from simmim_hf.cli import run_script
sys.argv = ["scripts/pretrain.py", *sys.argv[1:]]
run_script(pretrain.main)
"""


def finish_kill(workdir: Path, shards: list[str], base: Path, where: str) -> dict[str, str]:
    output = copy_finished(workdir, shards, f"cluster-finish-{where.split()[-1]}")
    finished = RunDir(output)
    pieces = {"encoder/": finished.encoder, "picture": finished.reconstruction, "summary": finished.summary,
              "card": finished.card}  # fmt: skip
    for path in pieces.values():  # the state right after the final checkpoint
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    module, name = FINISH_KILLS[where]
    args = pretrain_args(shards, output, MAX_STEPS)
    killed = launch([sys.executable, "-c", KILLER.format(module=module, name=name), *args])
    left = [piece for piece, path in pieces.items() if path.exists()]
    rerun = launch([sys.executable, "scripts/pretrain.py", *args])
    done = [piece for piece, path in pieces.items() if path.exists()]
    again = launch([sys.executable, "scripts/pretrain.py", *args])
    same = RunDir(output).summary.is_file() and (
        RunDir(output).read_summary()["loss_curve"] == loss_curve(uninterrupted(workdir, shards)[0])
    )
    ok = rerun.returncode == 0 and len(done) == 4 and "nothing to do" in again.stdout
    return row(
        f"SIGKILL while {where} of the finish is written, rerun",
        f"{'the rerun completed the finish without training' if ok else 'FAILED'}, exit {rerun.returncode}",
        f"killed (exit {killed.returncode}) with {', '.join(left) or 'nothing'} written; after the rerun: "
        f"{', '.join(done)}; summary's loss curve = the run's: {same}; the next rerun: "
        f"`{again.stdout.strip().replace(str(output), 'DIR')[:70]}...`",
    )


# -- launch mistakes, odd images --------------------------------------------------------------------------------
def launch_mistakes(workdir: Path, shards: list[str]) -> Rows:
    base = fresh(workdir / "cluster-mistakes")
    (base / "a-file").write_text("not a folder")
    (base / "no-images").mkdir()
    (base / "no-images" / "readme.txt").write_text("no images here")
    cases = [
        ("`--resume_from_checkpoint /nope/checkpoint-5`", "run", ["--resume_from_checkpoint", "/nope/checkpoint-5"]),
        ("`--per_device_train_batch_size 0`", "run", ["--per_device_train_batch_size", "0"]),
        ("an `--output_dir` that is a file", "a-file", []),
    ]  # scripts/pretrain.py's job in this process; prepare_data.py as a subprocess
    rows = []
    for fault, folder, flags in cases:
        output = base / folder
        start = time.perf_counter()
        result = in_process(pretrain_args(shards, output, 4, *flags))
        rows.append(mistake_row(fault, result, base, time.perf_counter() - start,
                                output.is_file() if folder == "a-file" else not output.exists()))  # fmt: skip
    start = time.perf_counter()
    result = launch([sys.executable, "scripts/prepare_data.py", "--source", str(base / "no-images"), "--output",
                     str(base / "shards")])  # fmt: skip
    rows.append(mistake_row("`prepare_data.py` on a folder with no images", result, base,
                            time.perf_counter() - start, not (base / "shards").exists()))  # fmt: skip
    return rows


def in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """scripts/pretrain.py's job under `cli.run_script` in this process (no interpreter start-up per case): its exit
    status and what it printed."""
    import contextlib
    import io

    from simmim_hf.cli import run_script
    from simmim_hf.pretrain.run import main

    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            run_script(lambda: main(argv))
        except SystemExit as stopped:
            code = stopped.code
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def mistake_row(fault: str, result: subprocess.CompletedProcess, base: Path, seconds: float, clean: bool) -> dict:
    lines = result.stderr.strip().splitlines()
    ok = result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and clean
    return row(
        fault,
        f"{'one line' if ok else 'FAILED'}, exit {result.returncode}",
        f"{len(lines)} stderr line(s): `{(lines[0] if lines else '').replace(str(base), 'DIR')[:150]}`; nothing left "
        f"behind: {clean}; {seconds:.1f} s",
    )


def oversized_image(workdir: Path, shards: list[str]) -> Rows:
    sys.path.insert(0, str(ROOT / "scripts"))
    from fault_matrix_data import fashion_images, oversized_png

    from simmim_hf.data.write_shards import PrepareDataArguments, prepare_data

    base = fresh(workdir / "cluster-oversized")
    for name in ("ten", "odd"):
        (base / name).mkdir()
        for index, image in enumerate(fashion_images(10)):
            image.save(base / name / f"image{index}.png")
    (base / "odd" / "zz-odd.png").write_bytes(oversized_png(12_000, 12_000))
    ten = prepare_data(PrepareDataArguments(source=str(base / "ten"), output=str(base / "ten-shards"), num_shards=1))
    result = launch([sys.executable, "scripts/prepare_data.py", "--source", str(base / "odd"), "--output",
                     str(base / "odd-shards"), "--num_shards", "1"])  # fmt: skip
    summary = json.loads((base / "odd-shards" / "prepare_data.json").read_text()) if result.returncode == 0 else {}
    stats, own = summary.get("image_stats", {}), ten["image_stats"]
    same = (stats.get("mean"), stats.get("std")) == (own["mean"], own["std"])
    ok = result.returncode == 0 and summary.get("num_written") == 10 and summary.get("num_skipped") == 1 and same
    return [row(
        "a 12000x12000 single-colour PNG among 10 images through `prepare_data.py`",
        f"{'skipped and counted; statistics those of the 10' if ok else 'FAILED'}, exit {result.returncode}",
        f"written {summary.get('num_written')}, skipped {summary.get('num_skipped_by_reason')}; "
        f"`{(summary.get('skipped') or [''])[0].replace(str(base), 'DIR')[:90]}`; mean {stats.get('mean')}, std "
        f"{stats.get('std')} (the 10 alone: {own['mean']}, {own['std']}); skips in the statistics "
        f"{stats.get('num_skipped')}",
    )]  # fmt: skip


# -- a resume with a real shuffle buffer -------------------------------------------------------------------------
def shuffle_buffer_resume(workdir: Path, shards: list[str]) -> Rows:
    """The demo's buffer (5,000) on 256 images (a buffer larger than the data, as the demo's on 2,048): SIGKILL at
    step 7, checkpoint at 5, resume to the end of the pass (16 steps); images compared by digest."""
    base = fresh(workdir / "cluster-shuffle")
    steps, kill = 16, 7
    extra = ("--shuffle_buffer_size", "5000", "--save_steps", "5")
    run(one_rank(shards, base / "straight", base / "p-straight", steps, *extra))
    killed = launch(one_rank(shards, base / "run", base / "p-killed", steps, *extra),
                    {"SIMMIM_PROBE_KILL_AT_STEP": str(kill)})  # fmt: skip
    resumed = launch(one_rank(shards, base / "run", base / "p-resumed", steps, *extra))
    straight = read_batches(base / "p-straight")
    seen = [d for batch in read_batches(base / "p-killed")[:5] for d in batch] + [
        d for batch in read_batches(base / "p-resumed") for d in batch
    ]
    counts = Counter(seen)
    twice = sum(count > 1 for count in counts.values())
    everything = {d for batch in straight for d in batch}
    never = len(everything - set(counts))
    same_order = read_batches(base / "p-resumed") == straight[5:]
    summary = RunDir(base / "run").read_summary() if RunDir(base / "run").summary.is_file() else {}
    skipped = summary.get("images_skipped_at_resume")
    ok = resumed.returncode == 0 and skipped == 0 and twice == 0 and never == 0 and same_order
    return [row(
        "shuffle buffer 5,000 on 256 images, SIGKILL at step 7, resumed from checkpoint-5 to the end of the pass",
        "nothing skipped or repeated; the same images in the same order" if ok else "FAILED",
        f"killed: exit {killed.returncode}; rerun exit {resumed.returncode}, resumed from "
        f"{resumed_from(resumed.stderr)}; images skipped at resume {skipped}; of the pass's {len(everything)} images: "
        f"seen twice {twice}, never {never}; resumed batches 6-16 equal to the uninterrupted ones image for image: "
        f"{same_order}",
    )]  # fmt: skip


GROUPS: list[Callable[[Path, list[str]], Rows]] = [
    preemption_one_rank,
    preemption_two_ranks,
    checkpoints,
    changed_runs,
    launch_mistakes,
    oversized_image,
    shuffle_buffer_resume,
]
