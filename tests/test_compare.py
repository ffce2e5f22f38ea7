"""Tests of minigpt.compare: argument checks, reading runs, the table and the plot, and one real
comparison of two tiny training runs (naive standing in for triton on CPU) against SDPA."""

import csv
import json
from pathlib import Path

import pytest

from minigpt import compare

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_arguments_are_checked_before_any_work(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  n_layer: 2\n")
    with pytest.raises(ValueError, match="--candidate must be one of"):
        compare.main(["--config", str(cfg), "--candidate", "flash"])
    with pytest.raises(ValueError, match="must differ"):
        compare.main(["--config", str(cfg), "--candidate", "sdpa", "--baseline", "sdpa"])
    with pytest.raises(ValueError, match="--model.attention is set by compare"):
        compare.main(["--config", str(cfg), "--candidate", "naive", "--model.attention=sdpa"])
    with pytest.raises(ValueError, match="--config must be an existing YAML file"):
        compare.main(["--config", str(tmp_path / "missing.yaml"), "--candidate", "naive"])
    assert not (tmp_path / "runs").exists()


def test_train_command_forwards_overrides_and_fixes_the_seed(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed_everything: 7\nmodel:\n  n_layer: 2\n")
    args, extra = compare.parse_args(
        ["--config", str(cfg), "--candidate", "naive", "--group", "g", "--trainer.max_steps", "3"]
    )
    assert extra == ["--trainer.max_steps", "3"]
    cmd = compare.train_command(args, "naive", extra)
    assert cmd[1:3] == ["-m", "minigpt.cli"]
    joined = " ".join(cmd)
    expected = ["--trainer.max_steps 3", "--seed_everything 7", "--model.attention naive"]
    for part in expected + ["--run_name g-naive", "--group g", "--trainer.default_root_dir runs"]:
        assert part in joined
    # a seed given among the overrides is left alone
    cmd = compare.train_command(args, "sdpa", ["--seed_everything", "3"])
    assert cmd.count("--seed_everything") == 1 and "3" in cmd


def write_run(run_dir: Path, attn_fwd: float, attn_bwd: float, tokens_per_s: float, first_loss: float):
    """A metrics.csv shaped like the CSVLogger's: sparse rows, several per step."""
    run_dir.mkdir(parents=True)
    keys = ["attn/bwd_ms", "attn/fwd_ms", "attn/share", "epoch", "perf/step_ms", "perf/tokens_per_s", "step",
            "train/loss", "val/loss"]  # fmt: skip
    rows = []
    for step in range(8):
        rows.append({"attn/fwd_ms": attn_fwd * (5 if step == 0 else 1), "attn/bwd_ms": attn_bwd,
                     "attn/share": 0.3, "perf/step_ms": 10.0, "step": step})  # fmt: skip
        rows.append({"train/loss": first_loss - 0.1 * step, "epoch": 0, "step": step})
        if step % 4 == 3:
            rows.append({"val/loss": 3.0 - 0.1 * step, "epoch": 0, "step": step})
        if step > 0:
            rows.append({"perf/tokens_per_s": tokens_per_s, "step": step})
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_summary_table_and_plot_from_metrics(tmp_path):
    write_run(tmp_path / "g-triton", attn_fwd=1.0, attn_bwd=3.0, tokens_per_s=2000.0, first_loss=5.5)
    write_run(tmp_path / "g-sdpa", attn_fwd=2.0, attn_bwd=4.5, tokens_per_s=1600.0, first_loss=5.5)
    runs = (compare.read_metrics(tmp_path / "g-triton"), compare.read_metrics(tmp_path / "g-sdpa"))
    cand, base = (compare.summarize(r) for r in runs)
    assert cand["attn_fwd_ms"] == 1.0  # the median leaves the first (warm-up) step out
    assert cand["final_train_loss"] == pytest.approx(5.5 - 0.7)
    assert (cand["best_val_loss"], cand["final_val_loss"]) == (pytest.approx(2.3), pytest.approx(2.3))
    speed = compare.speedups(cand, base)
    assert speed["attn_fwd"] == pytest.approx(2.0)
    assert speed["attn_bwd"] == pytest.approx(1.5)
    assert speed["attn_fwd_bwd"] == pytest.approx(6.5 / 4.0)
    assert speed["tokens_per_s"] == pytest.approx(1.25)
    table = compare.format_table(("triton", "sdpa"), (cand, base), speed)
    assert "triton vs sdpa" in table and "2.00x" in table and "1.25x" in table and "1.62x" in table
    png = tmp_path / "g-compare.png"
    compare.plot(png, ("triton", "sdpa"), runs, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---- a real comparison: two tiny training runs, each in its own process -----------------------------
def test_compare_naive_and_sdpa_on_the_tiny_config(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths (configs/) as a user runs it
    config = ["--config", str(TINY)]
    out = tmp_path / "runs"
    compare.main(
        config + [
            "--group", "tiny",
            "--out_dir", str(out),
            "--baseline", "sdpa",  # and the default candidate: naive on a machine without CUDA
            "--model.dropout", "0.0",  # dropout masks differ between backends; without, step 0 must agree
            "--trainer.max_steps", "6",
            "--trainer.val_check_interval", "3",
            "--trainer.log_every_n_steps", "1",
            "--trainer.accelerator", "cpu",
            "--data.cache_dir", str(tmp_path / "data"),
            "--wandb_mode", "offline",
        ]
    )  # fmt: skip
    printed = capfd.readouterr().out
    assert "naive vs sdpa" in printed and "attn fwd ms (median)" in printed

    png, summary_file = out / "tiny-compare.png", out / "tiny-compare.json"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(summary_file.read_text())
    assert (summary["candidate"], summary["baseline"]) == ("naive", "sdpa")
    naive, sdpa = summary["runs"]["naive"], summary["runs"]["sdpa"]
    # same seed, same data, same initial weights: the first loss agrees up to float rounding
    assert naive["first_train_step"] == sdpa["first_train_step"] == 0
    assert naive["first_train_loss"] == pytest.approx(sdpa["first_train_loss"], rel=1e-5)
    for run in (naive, sdpa):
        assert run["timed_steps"] == 6
        assert run["attn_fwd_ms"] > 0 and run["attn_bwd_ms"] > 0 and run["tokens_per_s"] > 0
    assert summary["speedup"]["attn_fwd"] == pytest.approx(sdpa["attn_fwd_ms"] / naive["attn_fwd_ms"])
    for name in ("naive", "sdpa"):  # the two runs, side by side in one wandb group
        assert (out / f"tiny-{name}" / "metrics.csv").is_file()
        assert any((out / f"tiny-{name}" / "wandb").glob("offline-run-*"))
