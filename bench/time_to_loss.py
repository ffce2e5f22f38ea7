"""Time to a good model, as a user would see it: nanoGPT's own train.py and our ``python train.py`` on the
same text, each a fresh process with empty compile caches, then a table and a figure.

    python bench/time_to_loss.py --out DIR [--text shakespeare|pystdlib | --source FILE]
        [--nanogpt NANOGPT_DIR] [--nanogpt_arg=--max_iters=100 ...] [--runs triton,sdpa] [--warm]
        [--side_by_side] [--target 1.364] [-- extra train.py arguments]

1. The text: a built-in corpus written to DIR/<text>.txt, or a text file of your own (--source).
2. nanoGPT (with --nanogpt, a checkout of karpathy/nanoGPT): the checkout is copied to a temporary folder,
   the text is written there as its character-level data (data/shakespeare_char/: train.bin, val.bin and
   meta.pkl, the first 90% of the characters for training), and ``python train.py
   config/train_shakespeare_char.py [--nanogpt_arg values]`` runs in the copy. Its output goes to
   DIR/nanogpt.log, each line prefixed by the seconds since launch (what plot_time_to_loss.py reads). Give
   nanoGPT's overrides with '=' (``--nanogpt_arg=--max_iters=100``), since they start with dashes.
3. Ours: one ``python train.py`` per backend of --runs (a comma list; repeat a backend for repeated runs),
   in order, with DIR/runs/<i>-<backend> as its trainer.default_root_dir and the extra arguments after
   ``--``; its output goes to DIR/runs/<i>-<backend>.log.
Every process gets its own empty TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR (removed afterwards) unless
--warm. nanoGPT runs first, then ours, one process at a time, so that the times compare; with
--side_by_side nanoGPT runs while ours do (on the same GPU: then only the losses compare). A run that fails
is reported with its exit status and the end of its log, and the others go on. Our first run builds the
token cache of the text in its own time if data/ lacks it (nanoGPT's data is written before its launch):
train once beforehand for times that compare exactly.

Writes DIR/summary.md (also printed): per run the first evaluation, the first evaluation at or below
--target, the final val loss, the last evaluation (seconds since launch), for ours the median tokens/s (of
the last three quarters of the steps) and the seconds to the end of the first step; the GPU, torch and
triton versions and the date. Then DIR/time_to_loss.png through plot_time_to_loss.py.
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import os
import pickle
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # runs as a script from a checkout, without installing minigpt

from minigpt.attention import BACKENDS  # noqa: E402
from minigpt.compare import read_metrics  # noqa: E402
from minigpt.data import BUILTIN_SOURCES, builtin_text  # noqa: E402

_spec = importlib.util.spec_from_file_location("plot_time_to_loss", HERE / "plot_time_to_loss.py")
plot_time_to_loss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_time_to_loss)

NANOGPT_CONFIG = "config/train_shakespeare_char.py"
NANOGPT_DATA = "data/shakespeare_char"  # where that config's dataset is read from
# A checkout may hold gigabytes of prepared datasets and checkpoints; the run needs none of them.
NANOGPT_SKIP = shutil.ignore_patterns(".git", "*.bin", "*.pt", "out-*")
LOG_TAIL_LINES = 15


@dataclass
class Run:
    """One process of the measurement and what its log or metrics.csv says."""

    label: str
    log: Path
    returncode: int | None = None
    wall_s: float = 0.0
    evaluations: list[tuple[int, float, float]] = field(default_factory=list)  # (step, seconds, val loss)
    curve_file: Path | None = None  # what plot_time_to_loss.read_curve reads
    tokens_per_s: float | None = None
    first_step_s: float | None = None


# ---------------------------------------------------------------------------------------------------------
# nanoGPT's data and its run


def write_nanogpt_char_data(text: str, folder: Path, train_fraction: float = 0.9) -> dict:
    """The text as nanoGPT's character-level data: train.bin and val.bin (uint16 token ids; the vocabulary
    is the sorted distinct characters; the first `train_fraction` of the characters train) and meta.pkl
    (vocab_size, itos, stoi). Returns the meta dict."""
    chars = sorted(set(text))
    if len(chars) > 1 << 16:
        raise ValueError(f"{len(chars)} distinct characters do not fit nanoGPT's uint16 token ids")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    # sorted characters are sorted code points, so a character's id is its code point's rank
    ids = np.searchsorted(np.array([ord(c) for c in chars], dtype=np.uint32), codes).astype(np.uint16)
    split = int(len(text) * train_fraction)
    folder.mkdir(parents=True, exist_ok=True)
    ids[:split].tofile(folder / "train.bin")
    ids[split:].tofile(folder / "val.bin")
    meta = {
        "vocab_size": len(chars),
        "itos": dict(enumerate(chars)),
        "stoi": {c: i for i, c in enumerate(chars)},
    }
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return meta


def run_logged(
    cmd: list[str], cwd: Path, log: Path, env: dict[str, str], header: str = ""
) -> tuple[int, float]:
    """Run `cmd`, its output (stdout and stderr) into `log` line by line, each prefixed by the seconds since
    launch; returns the exit status and the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", encoding="utf-8") as out:
        if header:
            out.write(header + "\n")
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            bufsize=1,
        )
        for line in proc.stdout:
            out.write(f"{time.monotonic() - start:7.1f} s  {line.rstrip()}\n")
            out.flush()  # a run of minutes can be followed with tail -f
        returncode = proc.wait()
    return returncode, time.monotonic() - start


@contextlib.contextmanager
def process_env(warm: bool):
    """The environment of one run: unbuffered output (the log's seconds are when a line was printed),
    wandb offline unless the caller chose, and unless `warm` empty compile caches of its own."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("WANDB_MODE", "offline")
    if warm:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="ttl-caches-") as tmp:
        for var, name in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
            (Path(tmp) / name).mkdir()
            env[var] = str(Path(tmp) / name)
        yield env


def read_text_exactly(path: Path) -> str:
    """The file's characters, line endings as written (nanoGPT must see the text ours trains on)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def run_nanogpt(checkout: Path, text_file: Path, nanogpt_args: list[str], log: Path, warm: bool) -> Run:
    run = Run("nanoGPT train.py", log, curve_file=log)
    text = read_text_exactly(text_file)
    with tempfile.TemporaryDirectory(prefix="ttl-nanogpt-") as tmp:
        copy = Path(tmp) / "nanoGPT"
        shutil.copytree(checkout, copy, ignore=NANOGPT_SKIP)
        meta = write_nanogpt_char_data(text, copy / NANOGPT_DATA)
        header = (
            f"nanoGPT data: {len(text):,} characters of {text_file}, {meta['vocab_size']} distinct, "
            f"in {NANOGPT_DATA}"
        )
        cmd = [sys.executable, "train.py", NANOGPT_CONFIG, *nanogpt_args]
        with process_env(warm) as env:
            run.returncode, run.wall_s = run_logged(cmd, copy, log, env, header)
    run.evaluations = nanogpt_evaluations(log)
    return run


def nanogpt_evaluations(log: Path) -> list[tuple[int, float, float]]:
    """(step, seconds, val loss) of each 'step N: train loss X, val loss Y' line of a prefixed log."""
    matches = (plot_time_to_loss._NANOGPT_LINE.match(line) for line in log.read_text().splitlines())
    return [(int(m[2]), float(m[1]), float(m[3])) for m in matches if m]


# ---------------------------------------------------------------------------------------------------------
# Our runs


def run_ours(i: int, backend: str, source: str, out: Path, extra: list[str], warm: bool) -> Run:
    root_dir = out / "runs" / f"{i}-{backend}"
    run = Run(f"minigpt {backend} #{i}", out / "runs" / f"{i}-{backend}.log")
    cmd = [sys.executable, "train.py", "--data.source", source, "--trainer.default_root_dir", str(root_dir),
           "--trainer.enable_progress_bar", "false", "--model.attention", backend, *extra]  # fmt: skip
    with process_env(warm) as env:
        run.returncode, run.wall_s = run_logged(cmd, ROOT, run.log, env)
    found = sorted(root_dir.glob("*/metrics.csv"))  # the run folder is named after the config
    if found:
        run.curve_file = found[0]
        read_run_metrics(found[0].parent, run)
    return run


def read_run_metrics(run_dir: Path, run: Run) -> None:
    """The evaluations, median tokens/s (last three quarters of the steps: the first ones compile) and the
    first step's time of a minigpt run folder, into `run`."""
    series = read_metrics(run_dir)
    seconds = dict(series.get("time/since_launch_s", []))
    evaluations = series.get("val/loss", [])
    run.evaluations = [(step, seconds[step], loss) for step, loss in evaluations if step in seconds]
    speeds = [v for _, v in series.get("perf/tokens_per_s", [])]
    if speeds:
        run.tokens_per_s = statistics.median(speeds[len(speeds) // 4 :])
    first = series.get("time/first_step_s", [])
    run.first_step_s = first[0][1] if first else None


# ---------------------------------------------------------------------------------------------------------
# The summary


def environment_line() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{gpu}, torch {torch.__version__}, triton {triton}, {date}"


def table_row(run: Run, target: float) -> str:
    label = run.label if run.returncode == 0 else f"{run.label} (failed, exit {run.returncode})"
    speed = f"{run.tokens_per_s:,.0f}" if run.tokens_per_s is not None else ""
    first_step = f"{run.first_step_s:.1f} s" if run.first_step_s is not None else ""
    if not run.evaluations:
        return f"| {label} | no evaluation | | | | {speed} | {first_step} |"
    (step0, s0, _), (_, s_last, v_last) = run.evaluations[0], run.evaluations[-1]
    reached = next(((n, s, v) for n, s, v in run.evaluations if v <= target), None)
    if reached:
        crossing = f"step {reached[0]} ({reached[2]:.4f}), {reached[1]:.1f} s"
    else:
        best_step, _, best = min(run.evaluations, key=lambda e: (e[2], e[0]))
        crossing = f"not reached (best {best:.4f} at step {best_step})"
    return (
        f"| {label} | {s0:.1f} s (step {step0}) | {crossing} | {v_last:.4f} | {s_last:.1f} s | {speed} "
        f"| {first_step} |"
    )


def summary(runs: list[Run], args, text_name: str, n_chars: int, command: str) -> str:
    how = (
        "nanoGPT ran while ours did, on the same machine: the times do not compare, only the losses"
        if args.side_by_side and args.nanogpt
        else "one process after the other"
    )
    caches = (
        "the caller's compile caches (--warm)" if args.warm else "empty Inductor and Triton cache folders"
    )
    lines = [
        f"# Time to val loss {args.target}: {text_name} ({n_chars:,} characters)",
        "",
        f"{environment_line()}. Each process with {caches}; {how}. Seconds from launch.",
        "",
        f"| run | first evaluation | val loss <= {args.target} | final val loss | last evaluation "
        "| tokens/s (median) | first step |",
        "|---|---|---|---|---|---|---|",
        *(table_row(run, args.target) for run in runs),
        "",
        f"Command: `{command}`",
        "",
        "Logs: " + ", ".join(str(run.log.relative_to(args.out)) for run in runs),
    ]
    for run in runs:
        if run.returncode != 0:
            tail = run.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            log = run.log.relative_to(args.out)
            lines += [
                "",
                f"{run.label} failed with exit status {run.returncode}; the end of {log}:",
                "",
                "```",
                *tail,
                "```",
            ]
    return "\n".join(lines) + "\n"


def write_figure(runs: list[Run], args, title: str) -> Path | None:
    curves = {run.label: plot_time_to_loss.read_curve(run.curve_file) for run in runs if run.curve_file}
    curves = {label: curve for label, curve in curves.items() if curve}
    if not curves:
        return None
    figure = args.out / "time_to_loss.png"
    plot_time_to_loss.plot(curves, figure, args.target, title)
    return figure


# ---------------------------------------------------------------------------------------------------------
# The command


def parse(argv: list[str]) -> argparse.Namespace:
    # everything after a bare '--' is for our train.py
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        description="Time to a good model: nanoGPT's train.py and ours, each a fresh process.",
        usage="%(prog)s --out DIR [options] [-- extra train.py arguments]",
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder of the logs, runs, table and figure"
    )
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--text", choices=BUILTIN_SOURCES, default="shakespeare", help="a built-in corpus")
    text.add_argument(
        "--source",
        type=Path,
        metavar="FILE",
        help="a text file to train both on instead of a built-in corpus",
    )
    parser.add_argument(
        "--nanogpt", type=Path, metavar="DIR", help="a checkout of karpathy/nanoGPT (without it, ours only)"
    )
    parser.add_argument(
        "--nanogpt_arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an override for nanoGPT's train.py, repeatable: --nanogpt_arg=--max_iters=100",
    )
    parser.add_argument(
        "--runs",
        default="triton,sdpa",
        help="attention backends of our runs, in order, one process each (default triton,sdpa)",
    )
    parser.add_argument("--warm", action="store_true", help="keep the caller's compile caches")
    parser.add_argument(
        "--side_by_side",
        action="store_true",
        help="run nanoGPT while ours run (the times then do not compare)",
    )
    parser.add_argument("--target", type=float, default=1.364, help="the val loss to reach (default 1.364)")
    args = parser.parse_args(argv[:cut])
    args.extra = argv[cut + 1 :]
    args.backends = [b.strip() for b in args.runs.split(",") if b.strip()]
    unknown = sorted(set(args.backends) - set(BACKENDS))
    if unknown:
        parser.error(
            f"--runs {args.runs!r}: unknown backend {', '.join(unknown)}; allowed: {', '.join(BACKENDS)}"
        )
    if args.nanogpt is not None:
        missing = [p for p in ("train.py", NANOGPT_CONFIG) if not (args.nanogpt / p).is_file()]
        if missing:
            parser.error(f"--nanogpt {args.nanogpt}: not a nanoGPT checkout (no {' and no '.join(missing)})")
    if args.source is not None and not args.source.is_file():
        parser.error(f"--source {args.source}: no such file")
    if not args.backends and args.nanogpt is None:
        parser.error("nothing to run: give --runs, --nanogpt or both")
    held = [
        p.name for p in (args.out / "summary.md", args.out / "nanogpt.log", args.out / "runs") if p.exists()
    ]
    if held:
        parser.error(
            f"--out {args.out} already holds a measurement ({', '.join(held)}): choose another folder"
        )
    # our runs start in the repository root, nanoGPT in a copy: paths must not depend on the folder
    args.out = args.out.resolve()
    args.nanogpt = args.nanogpt.resolve() if args.nanogpt is not None else None
    args.source = args.source.resolve() if args.source is not None else None
    return args


def report_end(run: Run) -> None:
    status = "done" if run.returncode == 0 else f"FAILED (exit {run.returncode})"
    print(f"{run.label}: {status} after {run.wall_s:.1f} s, {len(run.evaluations)} evaluations", flush=True)


def run_all(args: argparse.Namespace, text_file: Path, source: str) -> list[Run]:
    """nanoGPT, then ours one by one (or nanoGPT beside ours, with --side_by_side); the runs in that order."""
    nanogpt: list[Run] = []  # filled before ours run, or beside them
    errors: list[BaseException] = []
    nanogpt_thread = None
    if args.nanogpt is not None:
        nanogpt_log = args.out / "nanogpt.log"
        print(f"nanoGPT: {args.nanogpt} -> {nanogpt_log}", flush=True)

        def start_nanogpt() -> None:
            try:
                nanogpt.append(run_nanogpt(args.nanogpt, text_file, args.nanogpt_arg, nanogpt_log, args.warm))
            except BaseException as e:  # in a thread (--side_by_side) it would vanish: raised after the join
                errors.append(e)

        if args.side_by_side:
            nanogpt_thread = threading.Thread(target=start_nanogpt)
            nanogpt_thread.start()
        else:
            start_nanogpt()
            if errors:
                raise errors[0]
            report_end(nanogpt[0])
    ours: list[Run] = []
    for i, backend in enumerate(args.backends, start=1):
        print(f"minigpt {backend} #{i} -> {args.out / 'runs' / f'{i}-{backend}.log'}", flush=True)
        ours.append(run_ours(i, backend, source, args.out, args.extra, args.warm))
        report_end(ours[-1])
    if nanogpt_thread is not None:
        nanogpt_thread.join()
        if errors:
            raise errors[0]
        for run in nanogpt:
            report_end(run)
    return nanogpt + ours


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.source is not None:
        text_file, text_name, source = args.source, args.source.name, str(args.source)
    else:
        text_file, text_name, source = args.out / f"{args.text}.txt", args.text, args.text
        text_file.write_text(builtin_text(args.text), encoding="utf-8", newline="")
    n_chars = len(read_text_exactly(text_file))
    print(f"time to loss: {text_name}, {n_chars:,} characters; results in {args.out}", flush=True)

    runs = run_all(args, text_file, source)

    command = shlex.join(["python", "bench/time_to_loss.py", *argv])
    text = summary(runs, args, text_name, n_chars, command)
    (args.out / "summary.md").write_text(text)
    print("\n" + text, end="")
    title = f"{text_name}: " + (
        "side by side" if args.side_by_side and args.nanogpt else "one after the other"
    )
    figure = write_figure(runs, args, title + (", warm caches" if args.warm else ", cold compile caches"))
    print(
        f"wrote {args.out / 'summary.md'}" + (f" and {figure}" if figure else " (no evaluations: no figure)")
    )


if __name__ == "__main__":
    main()
