"""Training callbacks: throughput and MFU, where the time before the first step goes, and a text sample
after validation.

Attention timing (``attn/*``, ``perf/step_ms``) lives in ``minigpt.timing``.

ThroughputLogger measures wall time over windows of optimizer steps rather than per step. Timing one
step on a GPU needs a device synchronization at each end (the CPU runs ahead of the GPU), and a sync on
every step stalls the launch queue. A window ends on a step at which the loggers write: they read the
logged loss there, which synchronizes anyway, so the one ``torch.cuda.synchronize()`` per window costs
nothing extra. Validation and checkpointing are left out of the windows: the clock pauses when validation
starts and restarts at the next training batch. The first window starts after the first step, so
``torch.compile`` and start-up do not count.

Why not Lightning's ``ThroughputMonitor``: it synchronizes the GPU after every batch to read its clock,
which stalls the launch queue that a CUDA-graph step of a small model depends on, and its clock runs on
through validation. The peak FLOP/s for MFU do come from Lightning (``get_available_flops``).
"""

import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.utilities import rank_zero_info

from minigpt.model import check_sampling
from minigpt.module import seconds_since_launch

# Dense bf16 peaks (FLOP/s) of GPUs that Lightning's table knows under other names only (it reads the
# H200's only from names with "SXM1" or "NVL1"; torch reports "NVIDIA H200").
_MORE_BF16_PEAKS = {"NVIDIA H200": 989e12}


def _compute_dtype(precision: str) -> torch.dtype:
    """The dtype of the matrix products under a Trainer precision ("bf16-mixed", "16-true", "32-true"...)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def peak_flops(device: torch.device | str, precision: str = "bf16-mixed") -> float | None:
    """The device's peak FLOP/s for the matrix products of `precision` (Lightning's table), or None when
    unknown (a CPU, an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    dtype = _compute_dtype(precision)
    name = torch.cuda.get_device_name(device)
    if dtype == torch.bfloat16 and name in _MORE_BF16_PEAKS:
        return _MORE_BF16_PEAKS[name]
    peak = get_available_flops(device, dtype)  # warns once for a GPU it does not know
    return float(peak) if peak else None


class ThroughputLogger(L.Callback):
    """Logs ``perf/tokens_per_s`` and, on a GPU whose peak is known, ``perf/mfu`` (model FLOPs utilization:
    ``GPT.flops_per_token() * tokens/s / peak``, a fraction in [0, 1]), once per window of optimizer steps.

    Args:
        window: optimizer steps per measurement (None = the trainer's log_every_n_steps).
        peak_flops: the device's peak FLOP/s for MFU (None = ``peak_flops`` of the device and precision).
    """

    def __init__(self, window: int | None = None, peak_flops: float | None = None):
        if window is not None and window < 1:
            raise ValueError(f"window={window} must be None or >= 1")
        self.window = window
        self.peak_flops = peak_flops
        self._measuring = False  # the first optimizer step is done; windows are being timed
        self._start: float | None = None  # perf_counter when the clock (re)started; None while paused
        self._elapsed = 0.0  # seconds timed in the open window before the last pause
        self._tokens = 0  # tokens trained in the open window
        self._last_step = 0  # trainer.global_step after the last batch

    @staticmethod
    def _now(pl_module: L.LightningModule) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # once per window: see the module doc
        return time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = peak_flops(pl_module.device, trainer.precision)
        self._flops_per_token = pl_module.model.flops_per_token()
        self._measuring, self._start, self._elapsed, self._tokens = False, None, 0.0, 0
        self._last_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx):
        if self._measuring and self._start is None:
            # back from validation, which ended by reading its loss: the GPU is idle, no sync needed
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        stepped = trainer.global_step != self._last_step  # False while accumulating gradients
        self._last_step = trainer.global_step
        if not self._measuring:
            if stepped:  # the first step (compilation, warm-up) is over: open the first window
                self._measuring, self._start = True, self._now(pl_module)
            return
        self._tokens += batch[0].numel()
        window = self.window or trainer.log_every_n_steps  # log_every_n_steps 0: no step logging
        if not stepped or not window or trainer.global_step % window != 0:
            return
        now = self._now(pl_module)
        seconds = self._elapsed + now - self._start
        per_device = self._tokens / seconds  # every device trains batches of the same size
        metrics = {"perf/tokens_per_s": per_device * trainer.world_size}
        if self.peak_flops:
            metrics["perf/mfu"] = self._flops_per_token * per_device / self.peak_flops
        for logger in trainer.loggers:  # the step number Lightning gives this step's train/loss
            logger.log_metrics(metrics, step=trainer.global_step - 1)
        self._start, self._elapsed, self._tokens = now, 0.0, 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and not trainer.sanity_checking:
            self._elapsed += self._now(pl_module) - self._start  # the clock pauses for validation
            self._start = None


class StartupTimer(L.Callback):
    """Logs where the time before training goes, once, at the end of the first optimizer step, in seconds
    since the process started (``time/since_launch_s``'s clock):

    - ``time/fit_start_s``: Python, the imports, the config, the data and the model are ready;
    - ``time/sanity_check_s``: the sanity validation before training (with a compiled model, the first
      compilation of its evaluation graph);
    - ``time/first_step_s``: the first optimizer step is done (with a compiled model, the compilation of the
      training graph and, under reduce-overhead, the recording of its CUDA graphs).

    and prints them as one line. The GPU is synchronized once, at that step, to read the clock.
    """

    def __init__(self):
        self._fit_start = self._sanity = None
        self._start_step = 0  # trainer.global_step when training (re)started
        self._done = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start, self._sanity, self._done = seconds_since_launch(), 0.0, False

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step  # a resumed run starts past 0

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sanity = time.perf_counter()

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._sanity = time.perf_counter() - self._sanity

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if self._done or trainer.global_step == self._start_step:  # no optimizer step yet (accumulating)
            return
        self._done = True
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        first_step = seconds_since_launch()
        metrics = {"time/fit_start_s": self._fit_start, "time/sanity_check_s": self._sanity,
                   "time/first_step_s": first_step}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step - 1)
        step_s = max(0.0, first_step - self._fit_start - self._sanity)  # compiling, recording, the step
        rank_zero_info(
            f"first step done {first_step:.1f} s after launch: setup until {self._fit_start:.1f} s, sanity "
            f"validation {self._sanity:.1f} s, then {step_s:.1f} s to the end of the first step"
        )


class SampleText(L.Callback):
    """Prints a short sample of the model's text after each validation (and logs it to wandb), to watch
    the model learn. Off unless added, e.g. in a config:

        trainer:
          callbacks:
            - class_path: minigpt.callbacks.SampleText
              init_args: {max_new_tokens: 200}

    Args:
        prompt: the text the sample continues.
        max_new_tokens: tokens to generate (at most block_size minus the prompt).
        temperature: sampling temperature.
        top_k: sample among the k most likely tokens (None = all).
        seed: seeds the sampler, so that samples of successive validations compare.
    """

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 200,
        seed: int = 0,
    ):
        # checked now, not at the first validation, where a failure would lose the steps trained so far
        if not prompt:
            raise ValueError("prompt must be a non-empty string: the sample continues it")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, None)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.datamodule.setup()  # done by now in a fit (a no-op then): the tokenizer
        tokens = len(trainer.datamodule.tokenizer.encode(self.prompt, allowed_special="all"))
        block_size = pl_module.model.config.block_size
        if tokens >= block_size:
            raise ValueError(
                f"SampleText: the prompt is {tokens} tokens, which leaves no room to sample within "
                f"model.block_size={block_size}; shorten it"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        enc = trainer.datamodule.tokenizer
        idx = torch.tensor([enc.encode(self.prompt, allowed_special="all")], device=pl_module.device)
        n = max(0, min(self.max_new_tokens, pl_module.model.config.block_size - idx.size(1)))
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        out = pl_module.model.generate(idx, n, self.temperature, self.top_k, generator=generator)
        text = enc.decode(out[0].tolist())
        rank_zero_info(f"\n--- sample at step {trainer.global_step} ---\n{text}\n---")
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):  # WandbLogger: a table with one row per validation
                logger.log_text("samples", columns=["step", "text"], data=[[trainer.global_step, text]])
