"""Profile the training step of a config, inside Lightning's own training loop.

    python -m minigpt.bench_train --config configs/shakespeare_char.yaml [--steps 50] [--warmup 10]
        [--json bench.json] [--profile 3] [--model.attention triton --data.batch_size 32 ...]

The command line is train.py's (the same LightningCLI parser, configs and overrides; without ``--config``
the machine's default config; train.py's run options such as ``--run_name`` are accepted and ignored), plus
``--steps``, ``--warmup``, ``--json`` and ``--profile``. It builds what training builds (``GPTModule``,
``TextDataModule``, the Trainer's device, precision and clipping) and trains with ``Trainer.fit``, so the
steps are the module's own: its training step, gradient norm and clipping, optimizer and schedule, and
``torch.compile`` with CUDA graphs when the config asks for them. Nothing is written: no loggers, no
checkpoints, no validation, and no metrics logged from the steps (``log_every_n_steps`` 0).

A ``StepClock`` callback marks the boundaries of each step. First ``--warmup`` steps (compilation, the
allocator's first requests), then ``--steps`` measured steps, each synchronized at its end, are split into

    data          Lightning's loop between steps: the next batch, its copy to the device, the schedule step
    attn fwd/bwd  attention forward and backward, summed over layers (``minigpt.timing.AttentionTimer``)
    rest          the rest of forward and backward (zeroing the gradients, embeddings, projections, MLPs,
                  norms, loss)
    optimizer     gradient norm and clipping, the optimizer step

Then ``--steps`` more steps run free, as training runs them (no marks, no attention timer, no
synchronization until the last; after ``--warmup`` more when attention was timed: a compiled model compiles
again without the timer): tokens/s and MFU (``GPT.flops_per_token()`` x tokens/s over the GPU's peak from
``minigpt.callbacks.peak_flops``; none on a CPU or an unlisted GPU) come from those. ``--profile N`` then
runs N more steps under torch.profiler and lists the kernels that took the most GPU time (operator self
time on a CPU): where the next optimization starts.

Clocks. On CUDA every boundary is a CUDA event and the device is synchronized once, at the end of each
measured step: the next step then starts on an idle GPU, so its data part covers the host's wait for the
batch as well as the copy. Training never synchronizes per step; the measured steps do, to attribute time
to parts, so they can be slower than the free-running ones, by up to the host's whole launch time when the
host is the bottleneck. On the CPU the boundaries are ``time.perf_counter()`` marks.

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
from lightning.pytorch.cli import LightningArgumentParser

from minigpt.callbacks import peak_flops
from minigpt.cli import TRAINER_DEFAULTS, TrainCLI, settle_device_defaults, user_errors
from minigpt.data import TextDataModule
from minigpt.module import GPTModule
from minigpt.timing import AttentionTimer, attach_timer

PROG = "python -m minigpt.bench_train"

# (key in the result, name in the table) of the parts of a step, in the order a step runs them
PARTS = (
    ("data_ms", "data (loop, batch, copy to device)"),
    ("attn_fwd_ms", "attention forward"),
    ("attn_bwd_ms", "attention backward"),
    ("rest_ms", "rest of forward + backward"),
    ("optimizer_ms", "optimizer (norm, clip, step)"),
)


class _Clock:
    """Marks on the device's timeline: recorded CUDA events on a GPU, perf_counter seconds elsewhere."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


class StepClock(L.Callback):
    """Times the steps of a Lightning fit (see the module doc): `warmup` + `steps` measured steps (their
    attention too, with `time_attention`), then `steps` free-running ones (after `warmup` more when
    attention was timed), then `profile` steps under torch.profiler. `max_steps` is the fit's length."""

    def __init__(self, steps: int, warmup: int, profile: int, time_attention: bool):
        self.steps, self.warmup, self.profile = steps, warmup, profile
        self.timer = AttentionTimer() if time_attention else None
        self.measured = warmup + steps  # optimizer steps 0 .. measured - 1 are marked
        self.free_from = self.measured + (warmup if self.timer is not None else 0)
        self.profile_from = self.free_from + steps
        self.max_steps = self.profile_from + profile
        self.timed: list[dict] = []  # the parts of each measured step after the warm-up
        self.free_ms: float | None = None  # per step, free-running
        self.top_kernels: list[dict] | None = None
        self._marks: list | None = None  # boundaries of the open measured step
        self._profiler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock = _Clock(pl_module.device)
        self._done = trainer.global_step
        if self.timer is not None:
            attach_timer(pl_module.model, self.timer)
        self._restart()

    def _restart(self) -> None:
        """The next step starts now: after the bookkeeping (and synchronization) of the last one."""
        self._start, self._wall = self.clock.mark(), time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx):
        step = trainer.global_step
        if step >= self.measured:
            return
        if self._marks is None:  # the step's first micro-batch
            self._marks, self._open = [self._start], step
            if self.timer is not None:
                self.timer.start_step(step, pl_module.device)
        self._marks.append(self.clock.mark())  # the batch is on the device

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._marks is not None:
            self._marks.append(self.clock.mark())  # this micro-batch's forward and backward are done

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        done = trainer.global_step  # optimizer steps done: it moves once a step's last micro-batch is
        if done == self._done:
            return  # more micro-batches of this step to go
        self._done = done
        if self._marks is not None:
            self._close(outputs["loss"])
            if done == self.measured and self.timer is not None:
                attach_timer(pl_module.model, None)
        if done == self.free_from:
            self.clock.synchronize()
            self._free_start = time.perf_counter()
        if done == self.profile_from:
            self.clock.synchronize()
            self.free_ms = (time.perf_counter() - self._free_start) * 1e3 / self.steps
            if self.profile:
                self._start_profiler()
        if done == self.max_steps and self._profiler is not None:
            self.clock.synchronize()
            self._profiler.stop()
            self.top_kernels = _top_kernels(self._profiler, self.profile, self.clock.cuda)
        if done < self.measured:
            self._restart()

    def _close(self, loss: torch.Tensor) -> None:
        """End the open measured step: its parts, from its boundaries (see the module doc)."""
        marks = [*self._marks, self.clock.mark()]
        self._marks = None
        if self.timer is not None:
            self.timer.end_step()
        self.clock.synchronize()  # once per measured step, after its last event: see the module doc
        wall_ms = (time.perf_counter() - self._wall) * 1e3
        if self._open < self.warmup:
            if self.timer is not None:
                self.timer.flush()
            return
        spans = [self.clock.ms(a, b) for a, b in zip(marks, marks[1:])]  # data, fwd+bwd, ..., optimizer
        parts = {
            "data_ms": sum(spans[0:-1:2]),
            "fwd_bwd_ms": sum(spans[1:-1:2]),
            "optimizer_ms": spans[-1],
            "step_ms": self.clock.ms(marks[0], marks[-1]),
            "wall_ms": wall_ms,
            "loss": loss.item(),
        }
        if self.timer is not None:
            (attn,) = self.timer.flush()
            parts["attn_fwd_ms"], parts["attn_bwd_ms"] = attn.fwd_ms, attn.bwd_ms
        self.timed.append(parts)

    def _start_profiler(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activity = ProfilerActivity.CUDA if self.clock.cuda else ProfilerActivity.CPU
        self._profiler = profile(activities=[activity])
        self._profiler.start()


def _top_kernels(prof, n_steps: int, cuda: bool, top: int = 15) -> list[dict]:
    """The `top` kernels of a profile of `n_steps` steps by GPU time (on a CPU: the operators by self time),
    each with its time and calls per step and its share of the profiled total."""
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


class BenchCLI(TrainCLI):
    """train.py's parser with the benchmark's options; a Trainer that fits the StepClock's steps and writes
    nothing."""

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

    def settle(self) -> None:
        # train.py's device defaults, but no run folder and no checkpoint: nothing is written
        cfg = self.config
        for name, least in (("steps", 1), ("warmup", 0), ("profile", 0)):
            if cfg[name] < least:
                self.parser.error(f"--{name} must be >= {least}, got {cfg[name]}")
        self.attention_backend = settle_device_defaults(cfg)

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        cfg = self.config
        self.clock = StepClock(cfg.steps, cfg.warmup, cfg.profile, cfg.model.time_attention)
        quiet = dict(
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=0, limit_val_batches=0, num_sanity_val_steps=0, devices=1,
        )
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **quiet, **kwargs}
        trainer_cfg["max_steps"] = self.clock.max_steps
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        return self._instantiate_trainer(trainer_cfg, [*callbacks, self.clock])


def bench(cli: BenchCLI) -> dict:
    """Fit the StepClock's steps with the CLI's module, data and Trainer; returns the mean step split of
    the measured steps, tokens/s and MFU of the free-running ones (see the module doc)."""
    module, datamodule, trainer, clock = cli.model, cli.datamodule, cli.trainer, cli.clock
    trainer.fit(module, datamodule=datamodule)
    timed = clock.timed

    def mean(key: str) -> float | None:
        return statistics.fmean(t[key] for t in timed) if key in timed[0] else None

    model, device = module.model, trainer.strategy.root_device
    cfg = model.config
    accumulate = trainer.accumulate_grad_batches
    tokens_per_step = accumulate * datamodule.batch_size * cfg.block_size
    attn_fwd, attn_bwd = mean("attn_fwd_ms"), mean("attn_bwd_ms")
    tokens_per_s = tokens_per_step / (clock.free_ms / 1e3)
    peak = peak_flops(device, trainer.precision)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "attention": module.attention_backend,
        "precision": str(trainer.precision),
        "compile": module.hparams.compile_mode if module.hparams.compile else False,
        "time_attention": clock.timer is not None,
        "n_params": model.num_params(),
        "flops_per_token": model.flops_per_token(),
        "batch_size": datamodule.batch_size,
        "block_size": cfg.block_size,
        "accumulate_grad_batches": accumulate,
        "tokens_per_step": tokens_per_step,
        "warmup": clock.warmup,
        "steps": clock.steps,
        "data_ms": mean("data_ms"),
        "attn_fwd_ms": attn_fwd,
        "attn_bwd_ms": attn_bwd,
        "rest_ms": mean("fwd_bwd_ms") - (attn_fwd or 0.0) - (attn_bwd or 0.0),
        "optimizer_ms": mean("optimizer_ms"),
        "step_ms": mean("step_ms"),
        "step_ms_each": [t["step_ms"] for t in timed],
        "wall_ms": mean("wall_ms"),  # per step, with the synchronization and the timer's bookkeeping
        "free_step_ms": clock.free_ms,  # per step, free-running: what training gets
        "tokens_per_s": tokens_per_s,  # free-running
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": model.flops_per_token() * tokens_per_s / peak if peak else None,
        "loss": timed[-1]["loss"],
        "profiled_steps": clock.profile,
        "top_kernels": clock.top_kernels,
    }


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
        f"MFU       {r['mfu']:.1%} of {r['peak_tflops']:g} TFLOP/s ({r['precision']})"
        if r["mfu"] is not None
        else f"MFU       - (no known peak for {r['device']})",
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
    with user_errors(PROG):
        cli = BenchCLI(
            GPTModule,
            TextDataModule,
            run=False,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={
                "prog": PROG, "exit_on_error": False,
                "description": "Profile a config's training step: tokens/s, the step split, MFU.",
            },
            args=argv,
        )
        cli.datamodule.setup()  # the token cache: a bad source fails here, in one line
    result = bench(cli)
    configs = cli.config.get("config") or []
    result = {"config": str(configs[-1]) if configs else None, **result}
    print(format_table(result))
    if cli.config.json:
        path = Path(cli.config.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
