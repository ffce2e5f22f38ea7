"""Tests of minigpt.timing: the attention timer on toy modules and the GPT, its Lightning callback, and
(when train.py exists) that a tiny training run logs attention time for every step."""

import csv
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch._dynamo.testing
import torch.nn as nn

from minigpt.attention import attention
from minigpt.timing import AttentionTimer, AttentionTimingCallback, attach_timer

ROOT = Path(__file__).resolve().parents[1]


class ToyAttention(nn.Module):
    """The attention layer of minigpt.model in brief: projection, self._attend(q, k, v), output."""

    def __init__(self, backend: str = "sdpa", n_embd: int = 32, n_head: int = 4, n_kv_head: int = 2):
        super().__init__()
        self.backend, self.H, self.H_kv, self.D = backend, n_head, n_kv_head, n_embd // n_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.D)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def _attend(self, q, k, v):
        return attention(q, k, v, self.backend)

    def forward(self, x):
        B, T, C = x.shape
        H, H_kv, D = self.H, self.H_kv, self.D
        q, k, v = self.c_attn(x).split([H * D, H_kv * D, H_kv * D], dim=2)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        y = self._attend(q, k, v)
        return x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Toy(nn.Module):
    def __init__(self, n_layer: int = 3, backend: str = "sdpa"):
        super().__init__()
        self.layers = nn.ModuleList([ToyAttention(backend) for _ in range(n_layer)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def timer_attached(layer: nn.Module) -> bool:
    """Whether attach_timer routes the layer's attention through a timer now."""
    return "_attend" in vars(layer)


def make(n_layer=3, backend="sdpa", seed=0):
    torch.manual_seed(seed)
    model, timer = Toy(n_layer, backend), AttentionTimer()
    attach_timer(model, timer)
    return model, timer, torch.randn(2, 16, 32)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_one_forward_and_one_backward_per_layer_per_step(backend):
    model, timer, x = make(backend=backend)
    for step in range(3):
        timer.start_step(step)
        model(x).square().mean().backward()
        timer.end_step()
    timings = timer.pop_ready()
    assert [t.step for t in timings] == [0, 1, 2]
    for t in timings:
        assert (t.n_fwd, t.n_bwd) == (3, 3)
        assert t.fwd_ms > 0 and t.bwd_ms > 0
        assert t.fwd_ms + t.bwd_ms < t.step_ms
        assert 0 < t.share < 1
    assert timer.pop_ready() == []  # read once


def test_backward_time_only_when_backward_runs():
    model, timer, x = make()
    timer.start_step(0)
    model(x)  # with grad, but no backward
    timer.end_step()
    (t,) = timer.pop_ready()
    assert (t.n_fwd, t.n_bwd, t.bwd_ms) == (3, 0, 0.0)
    assert t.fwd_ms > 0


def test_nothing_recorded_in_eval_no_grad_or_outside_a_step():
    model, timer, x = make()
    model(x).sum().backward()  # no step open
    timer.start_step(0)
    with torch.no_grad():
        model(x)
    with torch.inference_mode():
        model(x)
    model.eval()
    model(x).sum().backward()  # eval mode, grad on: still not a training step
    timer.end_step()
    (t,) = timer.pop_ready()
    assert (t.n_fwd, t.n_bwd, t.fwd_ms, t.bwd_ms) == (0, 0, 0.0, 0.0)


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_timed_model_computes_the_same_outputs_and_gradients(backend):
    model, timer, x = make(backend=backend)
    x.requires_grad_(True)
    timer.start_step(0)
    out_timed = model(x)
    out_timed.square().sum().backward()
    timer.end_step()
    grads_timed = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    attach_timer(model, None)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad for p in model.parameters()] + [x.grad]
    assert torch.equal(out_timed, out)
    for a, b in zip(grads_timed, grads):
        assert torch.equal(a, b)


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: stands for slow work in a backward pass."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class SlowAttention(ToyAttention):
    """Attention that takes 10 ms forward and 20 ms backward, next to 40 ms of other work each way."""

    def _attend(self, q, k, v):
        time.sleep(0.010)
        return _SlowBackward.apply(attention(q, k, v, self.backend), 0.020)

    def forward(self, x):
        time.sleep(0.040)
        return _SlowBackward.apply(super().forward(x), 0.040)


def test_brackets_exactly_the_attention_forward_and_its_gradient():
    torch.manual_seed(0)
    model, timer = Toy(n_layer=2), AttentionTimer()
    model.layers = nn.ModuleList([SlowAttention() for _ in range(2)])
    attach_timer(model, timer)
    timer.start_step(0)
    model(torch.randn(2, 16, 32)).sum().backward()
    timer.end_step()
    (t,) = timer.pop_ready()
    # 2 layers x 10 ms forward and 2 x 20 ms backward; the other 2 x 40 ms each way would add 80 ms (busy
    # machines oversleep, hence the room above the expected times, kept below what a leak would add)
    assert 20 <= t.fwd_ms < 20 + 75, t
    assert 40 <= t.bwd_ms < 40 + 75, t
    assert t.step_ms >= 20 + 40 + 2 * 80


def test_steps_must_be_opened_and_closed_in_turn():
    timer = AttentionTimer()
    with pytest.raises(RuntimeError, match="no step is open"):
        timer.end_step()
    timer.start_step(0)
    with pytest.raises(RuntimeError, match="still open"):
        timer.start_step(1)


def test_under_torch_compile_each_attention_call_is_timed():
    model, timer, x = make(n_layer=2)
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(2):
        timer.start_step(step)
        compiled(x).square().mean().backward()
        timer.end_step()
    for t in timer.pop_ready():
        assert (t.n_fwd, t.n_bwd) == (2, 2)
        assert t.fwd_ms > 0 and t.bwd_ms > 0


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_gpt_with_timer(backend):
    from minigpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            block_size=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, attention=backend
        )
    )
    timer = AttentionTimer()
    attach_timer(model, timer)
    idx = torch.randint(0, 64, (2, 32))
    timer.start_step(0)
    _, loss = model(idx, idx)
    loss.backward()
    model.generate(idx[:, :4], max_new_tokens=3)  # no grad: not recorded
    timer.end_step()
    (t,) = timer.pop_ready()
    assert (t.n_fwd, t.n_bwd) == (2, 2)
    assert t.fwd_ms > 0 and t.bwd_ms > 0


# ---- the callback in a bare Lightning run ------------------------------------------------------------
class ToyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = Toy(n_layer=2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.model(x).square().mean()
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class Spy:
    """Records, per micro-batch, whether the model runs with the timer installed."""

    def __init__(self, module):
        self.module, self.installed = module, []

    def __call__(self, *args):
        self.installed.append(timer_attached(self.module.model.layers[0]))


@pytest.mark.parametrize(
    ("every", "log_every", "timed", "compiled"),
    [
        (1, 50, [0, 1, 2, 3], False),
        (None, 2, [1, 3], False),
        (3, 1, [2], False),
        (2, 2, [1, 3], True),
        (None, 1, [], True),  # compiled: ten times log_every_n_steps by default
    ],
)
def test_callback_logs_the_timed_optimizer_steps(tmp_path, every, log_every, timed, compiled):
    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(18, 16, 32))
    callback = AttentionTimingCallback(every_n_steps=every)
    module = ToyModule()
    counter = torch._dynamo.testing.CompileCounter()
    if compiled:
        torch.compiler.reset()
        module.model = torch.compile(module.model, backend=counter)
    spy = Spy(module)
    module.on_before_backward = spy  # runs inside each micro-batch, between the callback's hooks
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        log_every_n_steps=log_every,
        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    rows = [r for r in read_csv(tmp_path / "metrics.csv") if r.get("attn/fwd_ms")]
    assert [int(r["step"]) for r in rows] == timed
    for r in rows:
        fwd, bwd, share, step_ms = (
            float(r[k]) for k in ("attn/fwd_ms", "attn/bwd_ms", "attn/share", "perf/step_ms")
        )
        assert fwd > 0 and bwd > 0 and 0 < share < 1
        assert share == pytest.approx((fwd + bwd) / step_ms)
    # installed for the timed steps only (2 micro-batches each), removed at the end
    assert spy.installed == [s in timed for s in range(4) for _ in range(2)]
    assert not any(timer_attached(layer) for layer in module.model.layers)
    if compiled:  # timed steps ran eagerly: one graph, never recompiled with breaks at the attention calls
        assert counter.frame_count == 1
        torch.compiler.reset()


def test_callback_checks_its_argument():
    with pytest.raises(ValueError, match="every_n_steps must be None or an integer >= 1, got 0"):
        AttentionTimingCallback(every_n_steps=0)


# ---- integration: a tiny run of the training command --------------------------------------------------
@pytest.fixture(scope="module")
def data_cache(tmp_path_factory) -> Path:
    """One token cache for the module's runs: the corpus is built once."""
    return tmp_path_factory.mktemp("data")


def tiny_args(out_dir: Path, data_cache: Path) -> list[str]:
    """A run of a few seconds on CPU."""
    args = ["--config", str(ROOT / "configs" / "tiny.yaml")]
    return args + [
        "--trainer.max_steps", "6",
        "--trainer.val_check_interval", "3",
        "--trainer.log_every_n_steps", "1",
        "--trainer.accelerator", "cpu",
        "--data.cache_dir", str(data_cache),
        "--trainer.default_root_dir", str(out_dir),
        "--wandb_mode", "offline",
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["sdpa", "naive"])
def test_training_logs_attention_time_for_every_step(tmp_path, data_cache, backend, monkeypatch):
    from minigpt.cli import main

    monkeypatch.chdir(tmp_path)
    main(tiny_args(tmp_path / "runs", data_cache) + ["--model.attention", backend, "--run_name", "t"])
    run = tmp_path / "runs" / "t"
    rows = [r for r in read_csv(run / "metrics.csv") if r.get("attn/fwd_ms")]
    assert sorted(int(r["step"]) for r in rows) == list(range(6))
    for r in rows:
        assert float(r["attn/fwd_ms"]) > 0 and float(r["attn/bwd_ms"]) > 0
        assert 0 < float(r["attn/share"]) < 1 and float(r["perf/step_ms"]) > 0
    # The offline wandb run got the same rows: its records hold each value as JSON text. The wandb service
    # writes them out in the background; shutting it down waits for that.
    import wandb

    wandb.teardown()
    (record_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = record_file.read_bytes()
    for r in rows:
        for key in ("attn/fwd_ms", "attn/bwd_ms"):
            assert repr(float(r[key])).encode() in records, (key, r["step"])
