"""kernels.bench without a GPU: FLOPs, ratios, table, CSV, JSON, PNG writing, provider plumbing, the timed
steps, the before/after table and its checkout loader, --help."""

import csv
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels import bench
from kernels.bench import Result


def test_flops_formula():
    B, H, T, S, D = 2, 3, 5, 7, 11
    full = 4 * B * H * T * S * D
    assert bench.attention_flops(B, H, T, S, D, causal=False, mode="fwd") == full
    assert bench.attention_flops(B, H, T, T, D, causal=True, mode="fwd") == 4 * B * H * T * T * D / 2
    assert bench.attention_flops(B, H, T, T, D, causal=True, mode="bwd") == 2.5 * 4 * B * H * T * T * D / 2
    assert bench.attention_flops(B, H, T, S, D, causal=False, mode="fwd_bwd") == 3.5 * full
    # bottom-right causal mask: T < S sees the first S - T keys whole; T > S leaves T - S rows empty
    per_pair = 4 * B * H * D
    assert bench.attention_flops(B, H, T, S, D, causal=True, mode="fwd") == per_pair * (T * S - T * T / 2)
    assert bench.attention_flops(B, H, S, T, D, causal=True, mode="fwd") == per_pair * T * T / 2
    decode = bench.attention_flops(1, 1, 1, 4096, 64, causal=True, mode="fwd")
    assert decode == pytest.approx(4 * 4096 * 64, rel=1e-3), "one query sees every key"
    # The anchor table: SDPA default at (16, 12, 1024, 64), causal forward in 0.086 ms is about 300 TFLOP/s.
    tflops = bench.attention_flops(16, 12, 1024, 1024, 64, True, "fwd") / 0.086e-3 / 1e12
    assert 290 < tflops < 310
    with pytest.raises(ValueError, match="mode"):
        bench.attention_flops(1, 1, 1, 1, 1, True, "both")


def _fake_results() -> list[Result]:
    rows = [
        Result("sdpa", 4, 8, 256, 64, "fwd", ms=0.5),
        Result("ours", 4, 8, 256, 64, "fwd", ms=0.25),
        Result("flex", 4, 8, 256, 64, "fwd", note="Unavailable: no flex here"),
        Result("sdpa", 4, 8, 256, 64, "bwd", ms=2.0),
        Result("ours", 4, 8, 256, 64, "bwd", ms=4.0),
        Result("ours", 1, 8, 1024, 64, "fwd", ms=1.0),  # no baseline at this shape
    ]
    for r in rows:
        if r.ms is not None:
            r.tflops = bench.attention_flops(r.B, r.H, r.T, r.T, r.D, r.causal, r.mode) / (r.ms * 1e-3) / 1e12
    bench.add_ratios(rows)
    return rows


def test_ratios_and_table():
    rows = _fake_results()
    assert [r.ratio for r in rows] == [1.0, 2.0, None, 1.0, 0.5, None]
    table = bench.format_table(rows).splitlines()
    assert "provider" in table[0] and "TFLOP/s" in table[0] and "host us" in table[0] and "x sdpa" in table[0]
    assert len(table) == 2 + len(rows)
    assert table[3].split()[:3] == ["ours", "4,8,256,64", "fwd"] and table[3].split()[-1] == "2.00"
    assert "n/a" in table[4] and "no flex here" in table[4]


def test_write_csv_and_json(tmp_path):
    rows = _fake_results()
    csv_path, json_path = bench.write_results(rows, tmp_path / "out", meta={"gpu": "fake"})
    with csv_path.open() as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    assert read[1]["provider"] == "ours" and float(read[1]["ms"]) == 0.25 and float(read[1]["ratio"]) == 2.0
    assert read[2]["ms"] == "" and "no flex" in read[2]["note"]
    data = json.loads(json_path.read_text())
    assert data["meta"] == {"gpu": "fake"}
    assert data["results"][0]["T"] == 256 and data["results"][2]["tflops"] is None


def test_plots(tmp_path):
    sweep = []
    for D in (64, 128):
        for T in (256, 512, 1024):
            for mode in ("fwd", "bwd"):
                for i, provider in enumerate(("ours", "sdpa")):
                    sweep.append(
                        Result(provider, 16384 // T, 2048 // D, T, D, mode, tflops=100.0 + T / 100 + i)
                    )
    paths = bench.plot_sweep(sweep, tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"sweep_d{d}_{m}.png" for d in (64, 128) for m in ("fwd", "bwd")
    )
    assert all(p.stat().st_size > 1000 for p in paths)
    cells = [
        {"mode": m, "block_m": bm, "block_n": bn, "tflops": None if bm == 128 and bn == 128 else bm + bn}
        for m in ("fwd", "bwd")
        for bm in (64, 128)
        for bn in (32, 64, 128)
    ]
    path = bench.plot_heatmap(cells, (4, 16, 4096, 128), tmp_path)
    assert path.exists() and path.stat().st_size > 1000


def test_sweep_shapes_keep_tokens_and_width():
    shapes = bench.sweep_shapes()
    assert len(shapes) == len(bench.SWEEP_T) * 2
    for B, H, T, D in shapes:
        assert B * T == bench.SWEEP_TOKENS and H * D == bench.SWEEP_HIDDEN


def test_run_benchmarks_plumbing_on_cpu(monkeypatch):
    """Providers are built and called on real inputs; a failing one becomes n/a, not a crash."""
    calls = []

    def fake_time(fn, q, k, v, mode):
        out = fn(q, k, v)
        assert out.shape == q.shape and torch.isfinite(out).all()
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        calls.append(mode)
        if fn.__name__ == "naive" and mode == "bwd":
            raise torch.OutOfMemoryError("fake: out of memory")
        return (0.5 if fn.__name__ == "naive" else 1.0), 20.0

    monkeypatch.setattr(bench, "time_mode", fake_time)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    results = bench.run_benchmarks([(1, 2, 24, 16)], ["fwd", "bwd"], ["sdpa", "naive"], "fp32", device="cpu")
    by = {(r.provider, r.mode): r for r in results}
    assert len(results) == 4 and calls == ["fwd", "bwd", "fwd", "bwd"]
    assert by["sdpa", "fwd"].ratio == 1.0 and by["naive", "fwd"].ratio == 2.0
    assert math.isclose(
        by["naive", "fwd"].tflops, bench.attention_flops(1, 2, 24, 24, 16, True, "fwd") / 0.5e-3 / 1e12
    )
    assert by["naive", "bwd"].ms is None and "OutOfMemoryError" in by["naive", "bwd"].note
    assert "n/a" in bench.format_row(by["naive", "bwd"])
    assert by["sdpa", "fwd"].host_us == 20.0 and by["naive", "bwd"].host_us is None


@pytest.mark.parametrize("mode", bench.MODES)
def test_timed_steps_run_their_mode_and_keep_no_gradient(mode):
    """A step is the forward, the backward of an output made once, or both; gradients never pile up."""
    q, k, v = (torch.randn(1, 2, 8, 4, requires_grad=True) for _ in range(3))
    forwards = []

    def fn(q, k, v):
        forwards.append(1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    step = bench.make_step(fn, q, k, v, mode)
    made = len(forwards)
    step()
    first = None if q.grad is None else q.grad.clone()
    step()
    assert len(forwards) - made == (0 if mode == "bwd" else 2)
    assert (q.grad is None) == (mode == "fwd")
    if first is not None:
        assert torch.equal(q.grad, first), "the second backward replaces the gradient, does not add to it"
    with pytest.raises(ValueError, match="mode"):
        bench.make_step(fn, q, k, v, "both")


def test_before_after_table_flags_drops():
    rows = [
        Result("sdpa", 4, 8, 256, 64, "fwd", ms=1.0), Result("before", 4, 8, 256, 64, "fwd", ms=0.5),
        Result("ours", 4, 8, 256, 64, "fwd", ms=0.52),
        Result("sdpa", 4, 8, 256, 64, "bwd", ms=1.0), Result("before", 4, 8, 256, 64, "bwd", ms=1.0),
        Result("ours", 4, 8, 256, 64, "bwd", ms=0.9),
        Result("sdpa", 1, 8, 512, 64, "fwd", ms=1.0), Result("ours", 1, 8, 512, 64, "fwd", ms=1.0),
    ]
    bench.add_ratios(rows)
    table = bench.before_after(rows).splitlines()
    assert "before x sdpa" in table[0] and len(table) == 4, "one row per shape and mode that has both"
    assert table[2].startswith("| 4, 8, 256, 64 | fwd | 0.500 | 0.520 | 2.00 | 1.92 | -0.08 (drop) |")
    assert table[3].endswith("| 1.00 | 1.11 | 0.11 |")


def test_load_before_loads_another_checkout_beside_ours(tmp_path):
    """The other checkout's module loads under its own name; its custom op, named like ours, is registered
    under another namespace; its C++ host path is switched off; ours is untouched."""
    import kernels.flash_attention as ours

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "flash_attention.py").write_text(textwrap.dedent('''
        import torch

        _host_path_enabled = True

        @torch.library.custom_op("minigpt_kernels::flash_attention_forward", mutates_args=())
        def _forward_op(q: torch.Tensor) -> torch.Tensor:
            return q * 2

        def flash_attention(q, k, v, causal=True, dropout_p=0.0):
            return _forward_op(q)
    '''))
    before = bench.load_before(tmp_path)
    assert before is bench.load_before(tmp_path) and before is not ours
    assert before._host_path_enabled is False
    q = torch.ones(2)
    assert torch.equal(before.flash_attention(q, q, q), q * 2)
    namespace = before.__name__.removeprefix("minigpt_")
    assert torch.equal(getattr(torch.ops, f"minigpt_kernels_{namespace}").flash_attention_forward(q), q * 2)
    assert ours._forward_op._qualname == "minigpt_kernels::flash_attention_forward"
    with pytest.raises(bench.Unavailable, match="no kernels/flash_attention.py"):
        bench.load_before(tmp_path / "missing")
    bench.BEFORE_PATH = None
    with pytest.raises(bench.Unavailable, match="--before PATH"):
        bench.make_provider("before", q.view(1, 1, 2, 1), q.view(1, 1, 2, 1), True)


def test_unknown_provider_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    results = bench.run_benchmarks([(1, 1, 16, 16)], ["fwd"], ["nope"], "fp32", device="cpu")
    assert results[0].ms is None and "provider must be one of" in results[0].note


def test_parse_shape_and_lists():
    assert bench.parse_shape("64,6,256,64") == (64, 6, 256, 64)
    for bad in ("1,2,3", "a,b,c,d", "1,2,0,4"):
        with pytest.raises(Exception, match="four positive integers"):
            bench.parse_shape(bad)
    parser = bench.build_parser()
    args = parser.parse_args(
        ["--shapes", "1,2,3,4", "5,6,7,8", "--modes", "fwd,bwd", "--providers", "ours,sdpa"]
    )
    assert args.shapes == [(1, 2, 3, 4), (5, 6, 7, 8)] and args.modes == ["fwd", "bwd"]
    assert args.providers == ["ours", "sdpa"] and args.causal and args.out == "bench/results"
    with pytest.raises(SystemExit):
        parser.parse_args(["--providers", "ours,cuda-magic"])


def test_help_works_without_gpu():
    run = subprocess.run(
        [sys.executable, "-m", "kernels.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "--shapes" in run.stdout and "--heatmap" in run.stdout and "sdpa-cudnn" in run.stdout
    assert "--before" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_main_without_gpu_says_so(capsys):
    assert bench.main(["--modes", "fwd"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_every_provider_computes_attention_on_gpu():
    """Each provider that runs here gives SDPA's output (a misbuilt mask or backend would show)."""
    q, k, v = bench.make_inputs(2, 4, 256, 64, torch.bfloat16, seed=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for name in bench.PROVIDERS:
        try:
            fn, ctx = bench.make_provider(name, q, k, causal=True)
            with ctx():
                out = fn(q, k, v)
        except bench.Unavailable:
            continue
        except RuntimeError as e:  # a forced SDPA backend this GPU or build lacks
            assert name.startswith("sdpa-"), f"{name}: {e}"
            continue
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=name)


@pytest.mark.gpu
def test_bench_end_to_end_on_gpu(tmp_path):
    argv = ["--shapes", "2,4,256,64", "--providers", "sdpa,naive,unfused,ours", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    by = {(r["provider"], r["mode"]): r for r in data["results"]}
    for provider in ("sdpa", "naive", "unfused"):
        for mode in bench.MODES:
            assert by[provider, mode]["ms"] > 0 and by[provider, mode]["tflops"] > 0, (provider, mode)
    assert by["sdpa", "fwd"]["ratio"] == 1.0
    assert all(by[p, m]["host_us"] > 0 for p in ("sdpa", "naive", "unfused") for m in bench.MODES)
    assert (tmp_path / "bench.csv").exists() and (tmp_path / "unfused_steps.json").exists()


@pytest.mark.gpu
def test_graph_timing_agrees_with_triton_do_bench_cudagraph():
    """Our CUDA-graph timing of a forward reads what triton.testing.do_bench_cudagraph reads, within 25%."""
    from triton.testing import do_bench_cudagraph

    q, k, v = (t.detach() for t in bench.make_inputs(8, 16, 1024, 64, torch.bfloat16))
    fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ours, host = bench.time_mode(fn, q, k, v, "fwd")
    theirs = do_bench_cudagraph(lambda: fn(q, k, v), return_mode="median")
    assert 0.75 < ours / theirs < 1.25 and host > 0


@pytest.mark.gpu
def test_before_provider_times_another_checkout(tmp_path):
    """--before with this checkout itself: the before/after table has a row per shape and mode."""
    import pathlib

    root = pathlib.Path(bench.__file__).resolve().parents[1]
    argv = ["--shapes", "2,4,256,64", "--providers", "ours,before,sdpa", "--modes", "fwd,bwd",
            "--before", str(root), "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    table = (tmp_path / "before_after.md").read_text().splitlines()
    assert len(table) == 4 and "n/a" not in "".join(table[2:])


def test_dropout_reaches_every_part(monkeypatch, tmp_path):
    """--dropout applies to the table, the sweep and the heatmap alike, as their metadata says."""
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench, "environment", lambda: {"gpu": "test", "torch": "-", "triton": "-"})
    monkeypatch.setattr(bench, "run_benchmarks", lambda *a, dropout_p=0.0, **kw: seen.append(dropout_p) or [])
    monkeypatch.setattr(bench, "run_heatmap", lambda *a, dropout_p=0.0, **kw: seen.append(dropout_p))
    monkeypatch.setattr(bench, "write_results", lambda *a, **kw: [])
    monkeypatch.setattr(bench, "plot_sweep", lambda *a, **kw: [])
    monkeypatch.setattr(bench, "format_table", lambda *a, **kw: "")
    argv = ["--dropout", "0.2", "--sweep", "--heatmap", "--providers", "ours", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    assert seen == [0.2, 0.2, 0.2]


def test_heatmap_forces_each_block_pair(monkeypatch):
    """Every (BLOCK_M, BLOCK_N) is timed under forced_config; a pair the kernel refuses becomes n/a."""
    import contextlib
    import inspect

    forced = bench.forced_config_fn()
    if forced is not None:  # the kernel's hook takes the keywords the heatmap passes
        inspect.signature(forced).bind(block_m=64, block_n=32, num_warps=4)
    seen = []

    @contextlib.contextmanager
    def fake_forced(block_m, block_n, num_warps):
        if block_m == 256:
            raise ValueError("BLOCK_M=256 does not fit")
        seen.append((block_m, block_n, num_warps))
        yield

    monkeypatch.setattr(bench, "forced_config_fn", lambda: fake_forced)
    monkeypatch.setattr(bench, "time_mode", lambda fn, q, k, v, mode: (2.0 if mode == "bwd" else 1.0, 10.0))
    monkeypatch.setattr(bench, "make_inputs", lambda *a, **kw: (torch.ones(1),) * 3)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    cells = bench.run_heatmap((1, 2, 128, 64), "bf16", True, blocks=(64, 128, 256))
    assert len(cells) == 2 * 3 * 3 and len(seen) == 2 * 2 * 3
    assert {w for bm, bn, w in seen if bm * bn < 64 * 128} == {4}
    assert {(64, 128, 8), (128, 64, 8), (128, 128, 8)} <= set(seen)
    ok = [c for c in cells if c["block_m"] != 256]
    assert all(
        c["tflops"] == bench.attention_flops(1, 2, 128, 128, 64, True, c["mode"]) / (c["ms"] * 1e-3) / 1e12
        for c in ok
    )
    assert all(c["ms"] is None and "does not fit" in c["note"] for c in cells if c["block_m"] == 256)
