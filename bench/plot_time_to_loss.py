"""Validation loss against seconds since launch, for runs of minigpt and of nanoGPT, in one figure.

    python bench/plot_time_to_loss.py --run "LABEL=PATH" [--run ...] --out FIGURE.png
                                      [--target 1.364] [--title TEXT]

PATH is either a minigpt run's ``metrics.csv`` (its ``val/loss`` rows and their ``time/since_launch_s``)
or the printed output of nanoGPT's ``train.py`` with each line prefixed by the seconds since launch
("<seconds> s  step N: train loss X, val loss Y"). The figure marks the target loss and, per run, the
first evaluation at or below it. docs/measurements holds the inputs of docs/images/time_to_loss.png.
"""

import argparse
import csv
import re
from pathlib import Path

_NANOGPT_LINE = re.compile(r"^\s*([\d.]+) s\s+step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def read_curve(path: Path) -> list[tuple[float, float]]:
    """(seconds since launch, val loss) of every evaluation in a minigpt metrics.csv or a nanoGPT log."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("val/loss") and r.get("time/since_launch_s")]
        return [(float(r["time/since_launch_s"]), float(r["val/loss"])) for r in rows]
    matches = (_NANOGPT_LINE.match(line) for line in path.read_text().splitlines())
    return [(float(m[1]), float(m[3])) for m in matches if m]


def plot(runs: dict[str, list[tuple[float, float]]], out: Path, target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, curve in runs.items():
        seconds, losses = zip(*curve)
        (line,) = ax.plot(seconds, losses, marker="o", markersize=3, label=label)
        reached = next(((s, v) for s, v in curve if v <= target), None)
        if reached:
            ax.annotate(f"{reached[0]:.0f} s", reached, textcoords="offset points", xytext=(0, -14),
                        ha="center", color=line.get_color())
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"val loss {target}")
    low = min(v for curve in runs.values() for _, v in curve)
    top = max(1.8, target + 0.3)  # the approach to the target, not the first evaluations
    ax.set_ylim(low - 0.03, top if top > low else None)
    ax.set_xlim(0, None)
    ax.set_xlabel("seconds since launch")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=PATH")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--target", type=float, default=1.364)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, path = spec.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--run {spec!r}: give LABEL=PATH of an existing metrics.csv or nanoGPT log")
        curve = read_curve(Path(path))
        if not curve:
            parser.error(f"--run {spec!r}: no evaluations found in {path}")
        runs[label] = curve
    plot(runs, args.out, args.target, args.title)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
