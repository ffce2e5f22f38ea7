"""Per-step attention timing: forward and backward time of every attention call, summed over layers.

    timer = AttentionTimer()
    attach_timer(model, timer)            # each layer now runs y = timer(layer._attend, q, k, v)
    timer.start_step(step=0, device=...)
    loss = model(x, y)[1]; loss.backward(); optimizer.step()
    timer.end_step()
    for t in timer.pop_ready(): ...       # StepTiming(step, fwd_ms, bwd_ms, step_ms, ...)

What is measured
- Forward: the time of ``fn(q, k, v)``, from just before the call to just after it.
- Backward: the time of its gradient. Two identity autograd functions mark it, so it works for every
  backend alike (our Triton kernel, SDPA, the naive matmuls): one on the attention output, whose backward
  runs first and marks "backward starts", and one over (q, k, v) together, whose single backward node runs
  once all three input gradients exist and marks "backward ends".
- The step: from the start of its first micro-batch to the end of its optimizer step (with gradient
  accumulation one step is one optimizer step). Data loading and validation fall outside.

Clocks. On CUDA every mark is a CUDA event recorded on the current stream, so the numbers are GPU time
and nothing waits for the GPU: a closed step is read at the first step end at which its last event has
completed (at once when the GPU keeps up with the host, a step or more later when it runs behind; checked
with ``Event.query()``, which never blocks). Elsewhere the marks are ``time.perf_counter()`` wall time.

When nothing is recorded. Outside an open step, with gradients disabled (validation, ``generate``) or when
the attention module is in eval mode, the timer just calls ``fn(q, k, v)``. A backward that never runs
(a forward with grad but no ``backward()``) adds no backward time.

torch.compile. ``AttentionTimer.__call__`` is wrapped in ``torch.compiler.disable``, so in a compiled model
every timed attention call would be a graph break, and a model compiled with ``fullgraph=True`` cannot be
timed at all. ``AttentionTimingCallback`` therefore runs the timed steps of a compiled model eagerly
(``torch.compiler.set_stance("force_eager")``): nothing is recompiled, the CUDA graphs of ``reduce-overhead``
are left alone, and the other steps run the compiled model untouched. Hence, with ``compile`` on:
- ``attn/fwd_ms``, ``attn/bwd_ms``: the attention call and its gradient as they run eagerly: our Triton op or
  SDPA exactly as in the compiled graph (both are single opaque kernels there too); for ``naive``, its
  eager ops, not what Inductor would fuse them into.
- ``perf/step_ms`` and ``attn/share``: those of the eager step, slower than a compiled one; the compiled
  steps' speed is ``perf/tokens_per_s``, measured over all steps.
- Timed steps are rarer by default (see ``AttentionTimingCallback``), since each costs an eager step.

Cost. Per timed call: four clock marks and two tiny autograd nodes; on CUDA the events come from a pool
and are reused, so the hot path never allocates events nor synchronizes the device. The backward markers
are Python code that the autograd engine runs from its device thread, which is what costs on a GPU when
steps are short (see ``AttentionTimingCallback``: it times the logged steps, not all of them, by default).
"""

import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn as nn

Mark = Any  # a recorded torch.cuda.Event on CUDA, a time.perf_counter() float elsewhere


@dataclass
class _Span:
    """Two marks around one piece of work; ``end`` stays None while the work has not happened."""

    start: Mark = None
    end: Mark = None


@dataclass
class _Step:
    step: int
    cuda: bool
    start: Mark = None
    end: Mark = None
    fwd: list[_Span] = field(default_factory=list)
    bwd: list[_Span] = field(default_factory=list)


@dataclass
class StepTiming:
    """What one training step measured; times in milliseconds, attention summed over layers."""

    step: int
    fwd_ms: float
    bwd_ms: float
    step_ms: float
    n_fwd: int  # attention calls timed in forward
    n_bwd: int  # of those, how many had their backward run

    @property
    def share(self) -> float:
        """Attention forward + backward as a fraction of the step time."""
        return (self.fwd_ms + self.bwd_ms) / self.step_ms if self.step_ms > 0 else 0.0


class _BackwardStart(torch.autograd.Function):
    """Identity on the attention output; its backward runs just before the attention's backward."""

    @staticmethod
    def forward(ctx, timer: "AttentionTimer", span: _Span, out: torch.Tensor) -> torch.Tensor:
        ctx.timer, ctx.span = timer, span
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.span.start = ctx.timer._mark(grad.is_cuda)
        return None, None, grad


class _BackwardEnd(torch.autograd.Function):
    """Identity over (q, k, v); one node, so its backward runs once all three gradients are ready."""

    @staticmethod
    def forward(ctx, timer: "AttentionTimer", span: _Span, q, k, v):
        ctx.timer, ctx.span = timer, span
        return q.view_as(q), k.view_as(k), v.view_as(v)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        if ctx.span.start is not None:
            ctx.span.end = ctx.timer._mark(dq.is_cuda)
        return None, None, dq, dk, dv


class AttentionTimer:
    """Callable ``timer(fn, q, k, v) -> fn(q, k, v)`` that times each attention call and its gradient.

    Calls are grouped by training step: ``start_step`` / ``end_step`` bracket one optimizer step, and
    ``pop_ready`` returns the steps whose timings can be read without waiting (all of them on CPU; on CUDA
    those whose last event has completed). ``flush`` waits for the rest; call it off the hot path only.
    """

    def __init__(self) -> None:
        self._step: _Step | None = None  # the open step
        self._pending: deque[_Step] = deque()  # closed, not yet read
        self._events: list[torch.cuda.Event] = []  # free CUDA events, reused from step to step

    @property
    def step_open(self) -> bool:
        return self._step is not None

    # ---- clock ------------------------------------------------------------------------------------
    def _mark(self, cuda: bool) -> Mark:
        if not cuda:
            return time.perf_counter()
        event = self._events.pop() if self._events else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def _ms(start: Mark, end: Mark) -> float:
        if isinstance(start, float):
            return (end - start) * 1e3
        return start.elapsed_time(end)

    def _recycle(self, *marks: Mark) -> None:
        self._events.extend(m for m in marks if isinstance(m, torch.cuda.Event))

    # ---- steps ------------------------------------------------------------------------------------
    def start_step(self, step: int, device: torch.device | str = "cpu") -> None:
        """Open step number ``step`` (as logged); ``device`` picks the clock: CUDA events or wall time."""
        if self._step is not None:
            raise RuntimeError(f"step {self._step.step} is still open; call end_step() first")
        cuda = torch.device(device).type == "cuda"
        self._step = _Step(step=step, cuda=cuda)
        self._step.start = self._mark(cuda)

    def end_step(self) -> None:
        """Close the open step; its timings become readable through ``pop_ready`` once complete."""
        if self._step is None:
            raise RuntimeError("no step is open; call start_step() first")
        self._step.end = self._mark(self._step.cuda)
        self._pending.append(self._step)
        self._step = None

    def discard_step(self) -> None:
        """Drop the open step, if any, without reporting it."""
        self._step = None

    def pop_ready(self) -> list[StepTiming]:
        """The closed steps that can be read now, oldest first. Never blocks."""
        ready = []
        while self._pending and self._complete(self._pending[0]):
            ready.append(self._read(self._pending.popleft()))
        return ready

    def flush(self) -> list[StepTiming]:
        """Every closed step, waiting for the device if needed (at the end of training, not per step)."""
        if self._pending and self._pending[-1].cuda:
            self._pending[-1].end.synchronize()
        return self.pop_ready()

    @staticmethod
    def _complete(step: _Step) -> bool:
        return not step.cuda or step.end.query()

    def _read(self, step: _Step) -> StepTiming:
        fwd = [s for s in step.fwd if s.end is not None]
        bwd = [s for s in step.bwd if s.end is not None]
        timing = StepTiming(
            step=step.step,
            fwd_ms=sum(self._ms(s.start, s.end) for s in fwd),
            bwd_ms=sum(self._ms(s.start, s.end) for s in bwd),
            step_ms=self._ms(step.start, step.end),
            n_fwd=len(fwd),
            n_bwd=len(bwd),
        )
        # events of a backward that never ran (or is still to run) are left to the garbage collector
        for s in fwd + bwd:
            self._recycle(s.start, s.end)
        self._recycle(step.start, step.end)
        return timing

    # ---- the hook the model calls ----------------------------------------------------------------
    def _records(self, fn: Callable) -> bool:
        if self._step is None or not torch.is_grad_enabled():
            return False
        owner = getattr(fn, "__self__", None)  # the attention module, when fn is its bound method
        return not (isinstance(owner, nn.Module) and not owner.training)

    @torch.compiler.disable
    def __call__(self, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not self._records(fn):
            return fn(q, k, v)
        step, cuda = self._step, self._step.cuda
        needs_grad = q.requires_grad or k.requires_grad or v.requires_grad
        if needs_grad:
            bwd = _Span()
            q, k, v = _BackwardEnd.apply(self, bwd, q, k, v)
        fwd = _Span(start=self._mark(cuda))
        out = fn(q, k, v)
        fwd.end = self._mark(cuda)
        step.fwd.append(fwd)
        if needs_grad:
            out = _BackwardStart.apply(self, bwd, out)
            step.bwd.append(bwd)
        return out


def attach_timer(model: nn.Module, timer: Callable | None) -> None:
    """Route the attention call of every layer of `model` through `timer(fn, q, k, v)`, which returns
    `fn(q, k, v)`; None detaches it. A layer is a module whose forward calls its `_attend(q, k, v)` method, as
    `minigpt.model.CausalSelfAttention` does: an instance attribute of the same name shadows the method while
    attached, so the model itself knows nothing of timing."""
    for module in model.modules():
        if not callable(getattr(type(module), "_attend", None)):
            continue
        if timer is None:
            module.__dict__.pop("_attend", None)
        else:
            module._attend = functools.partial(timer, type(module)._attend.__get__(module))


def _is_compiled(pl_module: L.LightningModule) -> bool:
    """Whether the module asks for torch.compile or its model already is compiled."""
    model = pl_module.model
    return (
        bool(getattr(pl_module, "hparams", {}).get("compile", False))
        or isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        or getattr(model, "_compiled_call_impl", None) is not None
    )


class AttentionTimingCallback(L.Callback):
    """Logs ``attn/fwd_ms``, ``attn/bwd_ms``, ``attn/share`` and ``perf/step_ms`` of timed optimizer steps.

    Installs its ``AttentionTimer`` on ``pl_module.model`` (through ``attach_timer``) at the start of
    each timed step and removes it when the step ends, so that the other steps, validation and sampling
    run the model exactly as without timing. Each row goes straight to the trainer's loggers, at the step
    number Lightning gives that step's ``train/loss`` (0 for the first optimizer step). On CUDA a step is
    logged once its events are complete, typically while the next step runs; the last ones at the end.

    Args:
        every_n_steps: time one optimizer step in every ``every_n_steps``: the steps ``s`` with
            ``(s + 1) % every_n_steps == 0``, which are those whose ``train/loss`` the loggers write. None
            (the default) takes the trainer's ``log_every_n_steps`` (0: no step is timed); 1 times every
            step.

            For a compiled model, whose timed steps run eagerly, None takes ten times that.

    Why not every step by default: each timed attention call adds four CUDA events and two autograd nodes
    of Python, which the autograd engine runs inside the backward pass; when a step is launch-bound that
    shows. On an H100 the eager ``shakespeare_char`` model ran 6% (triton) to 11% (sdpa) slower with every
    step timed (``python -m minigpt.bench_train``); timing the logged steps divides that by ten.
    """

    def __init__(self, every_n_steps: int | None = None) -> None:
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be None or an integer >= 1, got {every_n_steps!r}")
        self.every_n_steps = every_n_steps
        self.timer = AttentionTimer()
        self._opened_at: int | None = None  # trainer.global_step when the open step started
        self._compiled = False
        self._eager = False  # whether this callback forced the compiled model to run eagerly

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._compiled = _is_compiled(pl_module)

    def interval(self, trainer: L.Trainer) -> int:
        """Optimizer steps between timed steps; 0: none is timed (log_every_n_steps 0 logs no step)."""
        if self.every_n_steps is not None:
            return self.every_n_steps
        return trainer.log_every_n_steps * (10 if self._compiled else 1)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx):
        step = trainer.global_step
        # the first micro-batch of an optimizer step that is timed
        every = self.interval(trainer)
        if not self.timer.step_open and self._opened_at != step and every and (step + 1) % every == 0:
            self._opened_at = step
            if self._compiled:
                torch.compiler.set_stance("force_eager")
                self._eager = True
            attach_timer(pl_module.model, self.timer)
            self.timer.start_step(step, pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        # global_step moves once the optimizer has stepped: that closes the step (also for a last,
        # partial accumulation at the end of an epoch)
        if self.timer.step_open and trainer.global_step != self._opened_at:
            self.timer.end_step()
            self._uninstall(pl_module)
            self._log(trainer, self.timer.pop_ready())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.timer.discard_step()  # a step cut short before its optimizer step has nothing to report
        self._uninstall(pl_module)
        self._log(trainer, self.timer.flush())

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException):
        self._uninstall(pl_module)

    def _uninstall(self, pl_module: L.LightningModule) -> None:
        attach_timer(pl_module.model, None)
        if self._eager:
            torch.compiler.set_stance("default")
            self._eager = False

    @staticmethod
    def _log(trainer: L.Trainer, timings: list[StepTiming]) -> None:
        for t in timings:
            metrics = {
                "attn/fwd_ms": t.fwd_ms,
                "attn/bwd_ms": t.bwd_ms,
                "attn/share": t.share,
                "perf/step_ms": t.step_ms,
            }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=t.step)
