"""Profile one training step of a config, outside Lightning's loop.

    python -m minigpt.bench_train --config configs/shakespeare_char.yaml [--steps 50] [--warmup 10]
        [--json bench.json] [--profile 3] [--model.attention triton --data.batch_size 32 ...]

The command line is train.py's (the same LightningCLI parser, configs and overrides; train.py's run options
such as ``--run_name`` are accepted and ignored), plus ``--steps``, ``--warmup``, ``--json`` and ``--profile``
(that many more steps under torch.profiler, then the kernels that took the most GPU time: where the next
optimization starts). From the
config it builds what training builds: the GPT of ``GPTModule`` (compiled when ``model.compile`` is true),
its optimizer and schedule (``GPTModule.configure_optimizers``), the training batches of
``TextDataModule``, the precision of the Trainer (bf16 autocast on a GPU, fp32 on the CPU, unless
``trainer.precision`` says otherwise) and its gradient clipping. Then it runs ``--warmup`` steps (they
absorb compilation and the allocator's first requests), ``--steps`` measured steps, then ``--steps`` more
steps free-running (after ``--warmup`` more when attention was timed: a compiled model compiles again
without the timer), and prints the mean step split of the measured steps into

    data          waiting for the next batch and copying it to the device
    attn fwd/bwd  attention forward and backward, summed over layers (``minigpt.timing.AttentionTimer``)
    rest          the rest of forward and backward (embeddings, projections, MLPs, norms, loss)
    optimizer     gradient norm and clipping, the optimizer step, the schedule step, zeroing the gradients

with tokens/s and MFU (``GPT.flops_per_token()`` x tokens/s over the GPU's bf16 peak from
``minigpt.callbacks.peak_tflops``; none on a CPU or an unlisted GPU). The parts share their boundaries, so
they add up to the step. Tokens/s and MFU come from the free-running steps, which run as training runs its
untimed steps: no marks, no attention timer, no synchronization, the host queueing work ahead of the GPU.

Clocks. On CUDA every boundary is a CUDA event and the device is synchronized once, at the end of each
timed step: the next step then starts on an idle GPU, so the span from its first event to the event after
the host-to-device copy covers the host's wait for the batch as well as the copy. Training never
synchronizes per step; the measured steps do, to attribute time to parts, so they can be slower than the
free-running ones, by up to the host's whole launch time when the host is the bottleneck. On the CPU the
boundaries are ``time.perf_counter()`` marks.

Compile and attention timing. ``AttentionTimer`` runs the attention call eagerly, so with
``model.compile`` true and ``model.time_attention`` true (the default) the measured steps run a compiled
model broken at every attention call; the free-running steps run it whole. ``--model.time_attention
false`` measures the model compiled whole in both, without the attention split.
"""

import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from minigpt.callbacks import peak_tflops
from minigpt.cli import TRAINER_DEFAULTS, TrainCLI, settle_device_defaults
from minigpt.data import TextDataModule
from minigpt.module import GPTModule, clip_gradients
from minigpt.timing import AttentionTimer

# (key in the result, name in the table) of the parts of a step, in the order a step runs them
PARTS = (
    ("data_ms", "data (wait + copy to device)"),
    ("attn_fwd_ms", "attention forward"),
    ("attn_bwd_ms", "attention backward"),
    ("rest_ms", "rest of forward + backward"),
    ("optimizer_ms", "optimizer (clip, step, schedule)"),
)


class _Clock:
    """Marks on the device's timeline: recorded CUDA events on a GPU, perf_counter seconds elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


_NO_SCALING = "fp16 loss scaling is not benchmarked; use bf16-mixed, bf16-true or 32-true"


def _scales_loss(trainer: L.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


class BenchCLI(TrainCLI):
    """train.py's parser with the benchmark's options; builds a Trainer without loggers or checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--steps", type=int, default=50, help="Timed training steps (>= 1).")
        parser.add_argument(
            "--warmup", type=int, default=10, help="Untimed steps first, for compilation and caches (>= 0)."
        )
        parser.add_argument("--json", type=str | None, default=None, help="Also write the numbers to a file.")
        parser.add_argument(
            "--profile", type=int, default=0,
            help="Then run this many more steps under torch.profiler and list the kernels that took the most "
            "time (GPU time on CUDA, operator self time on the CPU).",
        )

    def before_instantiate_classes(self) -> None:
        # train.py's device defaults, but no run folder and no checkpoint: nothing is written
        cfg = self.config
        if cfg.steps < 1:
            self.parser.error(f"--steps must be >= 1, got {cfg.steps}")
        if cfg.warmup < 0:
            self.parser.error(f"--warmup must be >= 0, got {cfg.warmup}")
        if cfg.profile < 0:
            self.parser.error(f"--profile must be >= 0, got {cfg.profile}")
        self.attention_backend = settle_device_defaults(cfg)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        # The Trainer only supplies the device, the precision and the clipping settings; one device.
        quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        quiet.update(enable_model_summary=False, devices=1)
        trainer = LightningCLI.instantiate_trainer(self, **quiet, **kwargs)
        if _scales_loss(trainer):
            self.parser.error(f"trainer.precision={trainer.precision!r}: {_NO_SCALING}")
        return trainer


def bench(
    module: GPTModule,
    datamodule: TextDataModule,
    trainer: L.Trainer,
    steps: int = 50,
    warmup: int = 10,
    profile: int = 0,
) -> dict:
    """Train `warmup` + `steps` steps of `module` on `datamodule`'s batches with `trainer`'s device,
    precision and clipping; returns the mean step split of the timed steps (see the module doc). With
    `profile` > 0, that many more free-running steps run under torch.profiler: "top_kernels" lists the
    kernels (operators on a CPU) that took the most time per step."""
    if _scales_loss(trainer):
        raise ValueError(f"trainer.precision={trainer.precision!r}: {_NO_SCALING}")
    device = trainer.strategy.root_device
    module.trainer = trainer  # configure_optimizers and setup read the device, precision and max_steps
    module.setup("fit")  # resolves the attention backend on the device; torch.compile when configured
    module = trainer.precision_plugin.convert_module(module).to(device)
    model = module.model
    model.train()
    opt_config = module.configure_optimizers()
    optimizer, schedule = opt_config["optimizer"], opt_config["lr_scheduler"]["scheduler"]
    accumulate = trainer.accumulate_grad_batches
    clip_val, clip_algorithm = trainer.gradient_clip_val, trainer.gradient_clip_algorithm
    attention_timer = AttentionTimer() if module.hparams.time_attention else None
    model.set_attention_timer(attention_timer)
    clock = _Clock(device)
    batches = iter(datamodule.train_dataloader(start=0))

    def step(index: int, measure: bool = True) -> dict | None:
        """One training step. measure: mark its parts, time attention (with the timer installed) and
        synchronize at its end; otherwise run it as training runs an untimed step, queued behind the
        previous steps."""
        mark = clock.mark if measure else lambda: None
        timer = attention_timer if measure else None
        wall = time.perf_counter()
        # boundaries: the start, then per micro-batch "copied" and "done", then the end; each part of the
        # step lies between two of them, so the parts add up to the step
        marks = [mark()]
        module.mark_step()
        if timer is not None:
            timer.start_step(index, device)
        for _ in range(accumulate):
            x, y = next(batches)
            x = x.to(device, non_blocking=True)  # pinned on CUDA
            y = y.to(device, non_blocking=True)
            marks.append(mark())
            with trainer.precision_plugin.forward_context():
                _, loss = model(x, y)
            (loss / accumulate).backward()
            marks.append(mark())
        # as GPTModule: the gradient norm every step (it is logged), clipping by it when configured
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        clip_gradients(params, clip_val, clip_algorithm, norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(mark())
        if timer is not None:
            timer.end_step()
        if not measure:
            return None
        if clock.cuda:
            torch.cuda.synchronize(device)  # once per step, after its last event: see the module doc
        wall_ms = (time.perf_counter() - wall) * 1e3
        spans = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]  # data, fwd+bwd, ..., optimizer
        parts = {
            "data_ms": sum(spans[0:-1:2]),
            "fwd_bwd_ms": sum(spans[1:-1:2]),
            "optimizer_ms": spans[-1],
            "step_ms": clock.ms(marks[0], marks[-1]),
            "wall_ms": wall_ms,
            "loss": loss.item(),
        }
        if timer is not None:
            (attn,) = timer.flush()
            parts["attn_fwd_ms"], parts["attn_bwd_ms"] = attn.fwd_ms, attn.bwd_ms
        return parts

    def synchronize() -> None:
        if clock.cuda:
            torch.cuda.synchronize(device)

    try:
        for i in range(warmup):
            step(i)
        timed = [step(warmup + i) for i in range(steps)]
        # the same number of steps again, free-running as in training: the host queues work ahead, and
        # attention runs untimed (training times one step in log_every_n_steps, or fewer)
        model.set_attention_timer(None)
        first = warmup + steps
        if attention_timer is not None:  # a compiled model compiles its graph without the timer first
            for i in range(warmup):
                step(first + i, measure=False)
            first += warmup
        synchronize()
        start = time.perf_counter()
        for i in range(steps):
            step(first + i, measure=False)
        synchronize()
        free_ms = (time.perf_counter() - start) * 1e3 / steps
        first += steps
        top = _top_kernels(lambda i: step(first + i, measure=False), profile, device) if profile else None
    finally:
        model.set_attention_timer(None)

    def mean(key: str) -> float | None:
        return statistics.fmean(t[key] for t in timed) if key in timed[0] else None

    cfg = model.config
    tokens_per_step = accumulate * datamodule.batch_size * cfg.block_size
    step_ms = mean("step_ms")
    attn_fwd, attn_bwd = mean("attn_fwd_ms"), mean("attn_bwd_ms")
    tokens_per_s = tokens_per_step / (free_ms / 1e3)
    peak = peak_tflops(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": module.attention_backend,
        "precision": str(trainer.precision),
        "compile": module.hparams.compile_mode if module.hparams.compile else False,
        "time_attention": attention_timer is not None,
        "n_params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "batch_size": datamodule.batch_size,
        "block_size": cfg.block_size,
        "accumulate_grad_batches": accumulate,
        "tokens_per_step": tokens_per_step,
        "warmup": warmup,
        "steps": steps,
        "data_ms": mean("data_ms"),
        "attn_fwd_ms": attn_fwd,
        "attn_bwd_ms": attn_bwd,
        "rest_ms": mean("fwd_bwd_ms") - (attn_fwd or 0.0) - (attn_bwd or 0.0),
        "optimizer_ms": mean("optimizer_ms"),
        "step_ms": step_ms,
        "step_ms_each": [t["step_ms"] for t in timed],
        "wall_ms": mean("wall_ms"),  # per step, with the synchronization and the timer's bookkeeping
        "free_step_ms": free_ms,  # per step, free-running: what training gets
        "tokens_per_s": tokens_per_s,  # free-running
        "peak_tflops": peak,
        "mfu": model.flops_per_token() * tokens_per_s / (peak * 1e12) if peak else None,
        "loss": timed[-1]["loss"],
        "profiled_steps": profile,
        "top_kernels": top,
    }
    return result


def _top_kernels(step, n_steps: int, device: torch.device, top: int = 15) -> list[dict]:
    """Run step(0) .. step(n_steps - 1) under torch.profiler; the `top` kernels by GPU time (on a CPU: the
    operators by self time), each with its time and calls per step and its share of the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for i in range(n_steps):
            step(i)
        if cuda:
            torch.cuda.synchronize(device)
    spent = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    events = sorted((e for e in prof.key_averages() if spent(e) > 0), key=spent, reverse=True)
    total = sum(spent(e) for e in events)
    return [
        {
            "name": e.key,
            "ms_per_step": spent(e) / 1e3 / n_steps,
            "calls_per_step": e.count / n_steps,
            "share": spent(e) / total,
        }
        for e in events[:top]
    ]


def format_table(r: dict) -> str:
    """The result of `bench` as a short text table."""
    micro = r["accumulate_grad_batches"]
    accumulate = f" x {micro} micro-batches" if micro > 1 else ""
    lines = [
        f"{r.get('config') or 'config'}: GPT {r['n_params'] / 1e6:.2f} M params, attention {r['attention']}, "
        f"{r['precision']} on {r['device']}, compile {r['compile'] or 'off'}",
        f"{r['batch_size']} x {r['block_size']} tokens{accumulate} = {r['tokens_per_step']:,} tokens per "
        f"step; {r['warmup']} warm-up + {r['steps']} timed steps (synchronized after each)",
        "",
        f"{'part':<34}{'ms/step':>10}{'share':>9}",
    ]
    for key, name in PARTS:
        value = r[key]
        if value is None:
            lines.append(f"{name:<34}{'-':>10}{'':>9}")
        else:
            lines.append(f"{name:<34}{value:>10.3f}{value / r['step_ms']:>9.1%}")
    each = r["step_ms_each"]
    lines += [
        f"{'step':<34}{r['step_ms']:>10.3f}{1:>9.1%}",
        "",
        f"synchronized step ms: min {min(each):.3f}, median {statistics.median(each):.3f}, max "
        f"{max(each):.3f}; wall {r['wall_ms']:.3f}",
        f"tokens/s  {r['tokens_per_s']:,.0f}   ({r['steps']} more steps free-running, as in training: "
        f"{r['free_step_ms']:.3f} ms/step)",
        f"MFU       {r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s bf16"
        if r["mfu"] is not None
        else f"MFU       - (no known bf16 peak for {r['device']})",
        f"loss      {r['loss']:.4f} at the last step",
    ]
    if r.get("top_kernels"):
        what = "GPU time" if r["device"] != "cpu" else "operator self time"
        lines += ["", f"top kernels by {what} ({r['profiled_steps']} profiled steps, free-running)",
                  f"{'ms/step':>9}{'calls':>7}{'share':>8}  name"]
        for k in r["top_kernels"]:
            name = k["name"] if len(k["name"]) <= 90 else k["name"][:87] + "..."
            lines.append(f"{k['ms_per_step']:>9.3f}{k['calls_per_step']:>7.0f}{k['share']:>8.1%}  {name}")
    if r["compile"] and r["time_attention"]:
        lines.append(
            "note: attention timing breaks the compiled graph at every attention call; "
            "--model.time_attention false measures the model compiled whole"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), benchmark, print the table; returns the result dict."""
    cli = BenchCLI(
        GPTModule,
        TextDataModule,
        run=False,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1337,
        save_config_callback=None,
        auto_configure_optimizers=False,
        parser_kwargs={
            "prog": "python -m minigpt.bench_train",
            "description": "Profile a config's training step: tokens/s, the step split, MFU.",
        },
        args=argv,
    )
    cfg = cli.config
    result = bench(
        cli.model, cli.datamodule, cli.trainer, steps=cfg.steps, warmup=cfg.warmup, profile=cfg.profile
    )
    configs = cfg.get("config") or []
    result = {"config": str(configs[-1]) if configs else None, **result}
    print(format_table(result))
    if cfg.json:
        path = Path(cfg.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
