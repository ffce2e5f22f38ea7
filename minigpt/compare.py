"""Train one config twice, with our Triton attention and with the SDPA baseline, and compare the runs.

    python -m minigpt.compare --config configs/shakespeare_char.yaml [--group NAME] [overrides ...]

Both runs use the same config, seed and data order and differ only in ``--model.attention``. Each trains
in its own process (``python -m minigpt.cli ...``, the command behind train.py), so CUDA state, compile
caches and memory never carry over from one run to the other. They are named ``<group>-<backend>`` and
share the wandb group ``<group>``. Any argument this command does not know (``--trainer.max_steps 200``,
``--data.batch_size 32`` ...) goes to both runs.

At the end it reads both runs' ``metrics.csv`` and prints a side-by-side table (final train loss, best and
final val loss, tokens/s, median attention forward and backward ms over the timed steps (see
``minigpt.timing``; the first is left out as warm-up), speedups), and writes
``<out_dir>/<group>-compare.png`` (loss curves overlaid; attention forward and backward ms per step) with
``<out_dir>/<group>-compare.json`` next to it.

Without CUDA the default candidate is ``naive`` instead of ``triton`` (the Triton kernels need a GPU,
short of running in the much slower interpreter); ``--candidate triton`` still asks for it.
"""

import argparse
import csv
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUN_BACKENDS = ("triton", "sdpa", "naive")

# name in the table, metric key in the summary, how to format it
ROWS = [
    ("first train loss", "first_train_loss", "{:.4f}"),  # at the first logged step (0 when logged)
    ("final train loss", "final_train_loss", "{:.4f}"),
    ("best val loss", "best_val_loss", "{:.4f}"),
    ("final val loss", "final_val_loss", "{:.4f}"),
    ("tokens/s (median)", "tokens_per_s", "{:,.0f}"),
    ("step ms (median)", "step_ms", "{:.2f}"),
    ("attn fwd ms (median)", "attn_fwd_ms", "{:.3f}"),
    ("attn bwd ms (median)", "attn_bwd_ms", "{:.3f}"),
    ("attn share (median)", "attn_share", "{:.1%}"),
]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m minigpt.compare",
        description="Train a config with two attention backends and compare loss and attention time.",
        epilog="Every other argument (e.g. --trainer.max_steps 200) is passed to both training runs.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", required=True, help="the YAML config both runs train (train.py --config)")
    parser.add_argument(
        "--candidate",
        default=None,
        help="the backend under test: triton (default on CUDA) or naive (default without CUDA) or sdpa",
    )
    parser.add_argument("--baseline", default="sdpa", help="the reference backend (default: sdpa)")
    parser.add_argument(
        "--group", default=None, help="wandb group and run name prefix (default: <config stem>-<date-time>)"
    )
    parser.add_argument("--out_dir", default="runs", help="where train.py puts the runs, and the PNG/JSON go")
    parser.add_argument(
        "--seed", type=int, default=None, help="both runs' seed_everything (default: the config's, else 1337)"
    )
    args, extra = parser.parse_known_args(argv)

    if args.candidate is None:
        import torch

        args.candidate = "triton" if torch.cuda.is_available() else "naive"
        if args.candidate == "naive":
            print("compare: no CUDA device, the candidate is naive (--candidate triton asks for the kernel)")
    for name in ("candidate", "baseline"):
        value = getattr(args, name)
        if value not in RUN_BACKENDS:
            raise ValueError(f"--{name} must be one of {RUN_BACKENDS}, got {value!r}")
    if args.candidate == args.baseline:
        raise ValueError(f"--candidate and --baseline must differ, both are {args.candidate!r}")
    if not Path(args.config).is_file():
        raise ValueError(f"--config must be an existing YAML file, got {args.config!r}")
    for flag in ("--model.attention", "--run_name", "--group", "--trainer.default_root_dir"):
        if any(a == flag or a.startswith(flag + "=") for a in extra):
            raise ValueError(
                f"{flag} is set by compare for each run, got {flag} in the overrides; "
                "use --candidate, --baseline, --group and --out_dir"
            )
    if args.group is None:
        args.group = f"{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return args, extra


def config_seed(config: str) -> int | None:
    """The config file's own ``seed_everything``, if it sets an integer one."""
    import yaml

    data = yaml.safe_load(Path(config).read_text()) or {}
    seed = data.get("seed_everything") if isinstance(data, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def train_command(args: argparse.Namespace, backend: str, extra: list[str]) -> list[str]:
    """The training command of one run: ``python -m minigpt.cli ...``, the command behind train.py."""
    cmd = [sys.executable, "-m", "minigpt.cli", "--config", args.config, *extra]
    # the seed spelled out, so that both runs share it whatever train.py's default is
    if args.seed is not None or not any(a.split("=")[0] == "--seed_everything" for a in extra):
        seed = args.seed if args.seed is not None else config_seed(args.config)
        cmd += ["--seed_everything", str(seed if seed is not None else 1337)]
    return cmd + [
        "--model.attention",
        backend,
        "--run_name",
        f"{args.group}-{backend}",
        "--group",
        args.group,
        "--trainer.default_root_dir",
        args.out_dir,
    ]


# ---- reading runs ---------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step, from the run's metrics.csv (rows may be sparse)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        found = sorted(run_dir.glob("**/metrics.csv"))
        if not found:
            raise FileNotFoundError(f"no metrics.csv under {run_dir}")
        path = found[-1]
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    for values in series.values():
        values.sort(key=lambda sv: sv[0])
    return series


def _median(series: dict, key: str, skip: int = 1) -> float | None:
    """Median over the steps, leaving out the first ``skip`` (warm-up, kernel compilation) when possible."""
    values = [v for _, v in series.get(key, [])]
    if len(values) > skip:
        values = values[skip:]
    return statistics.median(values) if values else None


def summarize(series: dict[str, list[tuple[int, float]]]) -> dict[str, float | None]:
    train = [v for _, v in series.get("train/loss", [])]
    val = [v for _, v in series.get("val/loss", [])]
    return {
        "first_train_step": series["train/loss"][0][0] if train else None,
        "first_train_loss": train[0] if train else None,
        "final_train_loss": train[-1] if train else None,
        "best_val_loss": min(val) if val else None,
        "final_val_loss": val[-1] if val else None,
        "tokens_per_s": _median(series, "perf/tokens_per_s"),
        "step_ms": _median(series, "perf/step_ms"),
        "attn_fwd_ms": _median(series, "attn/fwd_ms"),
        "attn_bwd_ms": _median(series, "attn/bwd_ms"),
        "attn_share": _median(series, "attn/share"),
        "timed_steps": len(series.get("attn/fwd_ms", [])),
    }


def speedups(cand: dict, base: dict) -> dict[str, float | None]:
    """How many times faster the candidate is than the baseline (> 1: candidate faster)."""

    def ratio(num, den):
        return num / den if num is not None and den not in (None, 0) else None

    def total(s):
        return (
            None
            if s["attn_fwd_ms"] is None or s["attn_bwd_ms"] is None
            else s["attn_fwd_ms"] + s["attn_bwd_ms"]
        )

    return {
        "attn_fwd": ratio(base["attn_fwd_ms"], cand["attn_fwd_ms"]),
        "attn_bwd": ratio(base["attn_bwd_ms"], cand["attn_bwd_ms"]),
        "attn_fwd_bwd": ratio(total(base), total(cand)),
        "tokens_per_s": ratio(cand["tokens_per_s"], base["tokens_per_s"]),
    }


def format_table(names: tuple[str, str], summaries: tuple[dict, dict], speed: dict[str, float | None]) -> str:
    def cell(fmt, value):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)

    header = ["", names[0], names[1], f"{names[0]} vs {names[1]}"]
    ratio_of = {"tokens_per_s": "tokens_per_s", "attn_fwd_ms": "attn_fwd", "attn_bwd_ms": "attn_bwd"}
    lines = []
    for label, key, fmt in ROWS:
        r = speed.get(ratio_of.get(key, ""))
        lines.append([label, cell(fmt, summaries[0][key]), cell(fmt, summaries[1][key]), cell("{:.2f}x", r)])
    lines.append(["attn fwd+bwd speedup", "", "", cell("{:.2f}x", speed["attn_fwd_bwd"])])
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(4)]
    out = []
    for n, row in enumerate([header, *lines]):
        out.append("  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]))
        if n == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)


def plot(path: Path, names: tuple[str, str], runs: tuple[dict, dict], title: str) -> None:
    """loss curves overlaid (train lines, val markers); attention forward and backward ms per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colors = ("tab:red", "tab:blue")
    ax = axes[0]
    for name, series, color in zip(names, runs, colors):
        for key, style in (("train/loss", dict(lw=1.2)), ("val/loss", dict(marker="o", ms=4, ls="--"))):
            if series.get(key):
                steps, values = zip(*series[key])
                ax.plot(steps, values, color=color, label=f"{name} {key.split('/')[0]}", **style)
    ax.set(title="loss", xlabel="step", ylabel="cross-entropy")
    ax.legend()
    for ax, key, label in ((axes[1], "attn/fwd_ms", "forward"), (axes[2], "attn/bwd_ms", "backward")):
        tops = []
        for name, series, color in zip(names, runs, colors):
            if series.get(key):
                steps, values = zip(*series[key])
                ax.plot(steps, values, color=color, lw=1, label=name)
                tops.append(sorted(values)[int(0.95 * (len(values) - 1))])
        if tops:  # the first steps (kernel compilation, autotuning) would flatten the rest
            ax.set_ylim(0, 1.5 * max(tops))
        ax.set(title=f"attention {label}, ms per step (all layers)", xlabel="step", ylabel="ms")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Run both trainings, print the table, write the PNG and the JSON summary."""
    args, extra = parse_args(argv)
    names = (args.candidate, args.baseline)
    out_dir = Path(args.out_dir)
    for backend in names:
        cmd = train_command(args, backend, extra)
        print(f"compare: training {args.group}-{backend}\n  {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise SystemExit(f"compare: the {backend} run failed (exit code {result.returncode})")

    runs = tuple(read_metrics(out_dir / f"{args.group}-{backend}") for backend in names)
    summaries = tuple(summarize(series) for series in runs)
    speed = speedups(*summaries)
    table = format_table(names, summaries, speed)
    png = out_dir / f"{args.group}-compare.png"
    plot(png, names, runs, title=f"{Path(args.config).name}: {names[0]} vs {names[1]} attention")
    summary = {
        "config": args.config,
        "group": args.group,
        "overrides": extra,
        "candidate": names[0],
        "baseline": names[1],
        "runs": {name: {"run_name": f"{args.group}-{name}", **s} for name, s in zip(names, summaries)},
        "speedup": speed,
        "png": str(png),
    }
    json_path = png.with_suffix(".json")
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{table}\n\nplot: {png}\nsummary: {json_path}")


if __name__ == "__main__":
    main()
