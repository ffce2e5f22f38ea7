"""bench/plot_time_to_loss.py: both run formats read back as (seconds, val loss); the figure is written."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("plot_time_to_loss", ROOT / "bench" / "plot_time_to_loss.py")
plot_time_to_loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_time_to_loss)


def test_reads_both_formats_and_writes_the_figure(tmp_path, capsys):
    log = tmp_path / "nanogpt.log"
    log.write_text("nanoGPT data: 100 characters\n   28.7 s  step 0: train loss 4.5202, val loss 4.5128\n"
                   "   45.8 s  step 250: train loss 2.0076, val loss 1.3500\n  46.0 s  iter 260: loss 1.9\n")
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,train/loss,val/loss,time/since_launch_s\n9,2.0,,\n99,,2.1753,59.7\n199,,1.3608,62.0\n")
    assert plot_time_to_loss.read_curve(log) == [(28.7, 4.5128), (45.8, 1.35)]
    assert plot_time_to_loss.read_curve(metrics) == [(59.7, 2.1753), (62.0, 1.3608)]
    out = tmp_path / "figure.png"
    plot_time_to_loss.main(["--run", f"nanoGPT={log}", "--run", f"ours={metrics}", "--out", str(out)])
    assert out.read_bytes().startswith(b"\x89PNG") and capsys.readouterr().out == f"wrote {out}\n"


def test_a_run_without_evaluations_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    with pytest.raises(SystemExit) as e:
        plot_time_to_loss.main(["--run", f"x={empty}", "--out", str(tmp_path / "f.png")])
    assert e.value.code == 2 and "no evaluations found" in capsys.readouterr().err
