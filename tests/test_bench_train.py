"""The training-step benchmark: its step split adds up, its clocks agree, and bad command lines fail clearly.

CPU tests bench configs/tiny.yaml on a 300 K character slice of the built-in corpus, in a temporary folder.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from minigpt.bench_train import PARTS, main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")

# main(argv) is called in-process while pytest's own arguments sit in sys.argv, as LightningCLI notices
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from minigpt.data import shakespeare_text

    root = tmp_path_factory.mktemp("bench_train")
    (root / "corpus.txt").write_text(shakespeare_text()[:300_000])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads on a busy machine
    yield root
    torch.set_num_threads(threads)


def tiny_args(workdir: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY,
        "--data.source", str(workdir / "corpus.txt"),
        "--data.cache_dir", str(workdir / "data"),
        *extra,
    ]


def check_split(r: dict) -> None:
    """Every part is a real duration and the parts add up to the step, whose time an independent wall clock
    around the whole step confirms."""
    parts = [r[key] for key, _ in PARTS if r[key] is not None]
    assert all(p > 0 for p in parts), {key: r[key] for key, _ in PARTS}
    assert sum(parts) == pytest.approx(r["step_ms"], rel=1e-3), "the parts must add up to the step"
    assert len(r["step_ms_each"]) == r["steps"]
    assert sum(r["step_ms_each"]) / r["steps"] == pytest.approx(r["step_ms"])
    assert 0.5 * r["wall_ms"] < r["step_ms"] <= r["wall_ms"] * 1.01, (r["step_ms"], r["wall_ms"])
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / (r["free_step_ms"] / 1e3))
    assert 0.3 * r["step_ms"] < r["free_step_ms"] < 3 * r["step_ms"], "free-running steps: the same work"
    assert math.isfinite(r["loss"]) and r["loss"] < math.log(257) + 0.5


def test_tiny_step_split(workdir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (no run folder, no logs)
    from minigpt.timing import AttentionTimer

    timed_steps, start_step = [], AttentionTimer.start_step

    def recording_start_step(self, step, device):
        timed_steps.append(step)
        start_step(self, step, device)

    monkeypatch.setattr(AttentionTimer, "start_step", recording_start_step)
    out = tmp_path / "bench" / "tiny.json"
    r = main(tiny_args(workdir, "--steps", "6", "--warmup", "2", "--json", str(out)))
    assert timed_steps == list(range(8)), "warm-up and measured steps timed, the free-running ones not"

    assert r["device"] == "cpu" and r["attention"] == "sdpa" and r["precision"] == "32-true"
    assert r["tokens_per_step"] == 8 * 32 and r["steps"] == 6 and r["warmup"] == 2
    assert r["tokens_per_s"] > 0
    assert r["attn_fwd_ms"] > 0 and r["attn_bwd_ms"] > 0, "attention is timed by default"
    check_split(r)
    assert r["mfu"] is None and r["peak_tflops"] is None, "no MFU on a CPU"
    assert r["flops_per_token"] > 6 * r["n_params"]

    assert json.loads(out.read_text()) == json.loads(json.dumps(r)), "--json writes the returned numbers"
    table = capsys.readouterr().out
    for line in ("tokens/s", "attention forward", "attention backward", "optimizer", "MFU       -"):
        assert line in table, f"{line!r} not in the table:\n{table}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


def test_the_steps_are_the_modules_own(workdir, monkeypatch):
    """The benchmark trains through Lightning's loop: every step runs GPTModule's training step and its
    gradient clipping, micro-batches included."""
    from minigpt.module import GPTModule

    calls = {"training_step": 0, "configure_gradient_clipping": 0}
    for name in calls:
        method = getattr(GPTModule, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            calls[_name] += 1
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(GPTModule, name, counted)
    r = main(tiny_args(workdir, "--steps", "3", "--warmup", "1", "--trainer.accumulate_grad_batches", "2",
                       "--model.time_attention", "false"))  # fmt: skip
    steps = 1 + 3 + 3  # warm-up, measured, free-running (no second warm-up without attention timing)
    assert calls == {"training_step": 2 * steps, "configure_gradient_clipping": steps}
    assert r["steps"] == 3


def test_accumulation_and_no_attention_timing(workdir):
    r = main(
        tiny_args(
            workdir, "--steps", "3", "--warmup", "1",
            "--trainer.accumulate_grad_batches", "2", "--model.time_attention", "false",
            "--data.batch_size", "4",
        )
    )
    assert r["tokens_per_step"] == 2 * 4 * 32, "a step is one optimizer step over both micro-batches"
    assert r["attn_fwd_ms"] is None and r["attn_bwd_ms"] is None and not r["time_attention"]
    check_split(r)


def test_profile_lists_the_costliest_kernels(workdir, capsys):
    r = main(tiny_args(workdir, "--steps", "2", "--warmup", "1", "--profile", "2"))
    top = r["top_kernels"]
    assert r["profiled_steps"] == 2 and 0 < len(top) <= 15
    spent = [k["ms_per_step"] for k in top]
    assert all(t > 0 for t in spent) and spent == sorted(spent, reverse=True), spent
    assert 0 < sum(k["share"] for k in top) <= 1 + 1e-9
    assert any("mm" in k["name"] or "linear" in k["name"] for k in top), [k["name"] for k in top]
    assert "top kernels by operator self time (2 profiled steps" in capsys.readouterr().out
    assert main(tiny_args(workdir, "--steps", "1", "--warmup", "0"))["top_kernels"] is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model.n_layers", "3"], "n_layers"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--profile", "-1"], "--profile must be >= 0, got -1"),
    ],
)
def test_bad_options_fail_clearly(workdir, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, *extra))
    assert e.value.code != 0
    assert message in capsys.readouterr().err


def test_missing_config_fails_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "configs/no_such_config.yaml"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "no_such_config.yaml" in err and "does not exist" in err


@pytest.mark.gpu
def test_tiny_step_split_on_gpu_with_triton(workdir):
    r = main(tiny_args(workdir, "--steps", "5", "--warmup", "3", "--model.attention", "triton"))
    assert r["attention"] == "triton" and r["precision"] == "bf16-mixed"
    assert r["attn_fwd_ms"] > 0 and r["attn_bwd_ms"] > 0
    check_split(r)
    if r["peak_tflops"] is not None:
        assert 0 < r["mfu"] < 1
