"""GPTModule: the LightningModule that trains a GPT on next-token prediction.

Its typed ``__init__`` arguments are the ``model:`` section of the config: its own training settings, and
the fields of ``GPTConfig`` passed through under their own names (LightningCLI reads both, with their docs,
from the signatures), so each model setting is written once, in ``minigpt.model``. The module owns the
loss, the optimizer (AdamW, or Muon with AdamW: ``minigpt.optim``), the learning-rate schedule (linear
warmup, then cosine decay to ``min_lr``, stepped per optimizer step), gradient clipping, ``torch.compile``,
what FSDP changes (sharded gradient norm, wrapped parameter names) and the project's callbacks.

Reproducibility. The data stream is a pure function of (seed, sample index) (see ``minigpt.data``); the
dropout masks are made one too: before every micro-batch the global RNG is seeded from (seed, micro-step
index). A run resumed from a checkpoint therefore continues the very trajectory it left, with no RNG state
in the checkpoint to restore.
"""

import dataclasses
import math
import os
import platform
import time
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from minigpt.attention import resolve_backend
from minigpt.model import GPT, GPTConfig
from minigpt.optim import make_optimizer

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class GPTModule(L.LightningModule):
    def __init__(
        self,
        learning_rate: float = 1e-3,
        min_lr: float = 1e-4,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.99),
        optimizer: Literal["adamw", "muon"] = "adamw",
        muon_lr: float = 0.01,
        muon_momentum: float = 0.95,
        compile: bool = False,
        compile_mode: CompileMode = "default",
        time_attention: bool = True,
        **model_config,
    ):
        """A GPT trained on next-token cross-entropy.

        Args:
            learning_rate: peak learning rate, reached at the end of the warmup.
            min_lr: learning rate at the end of the cosine decay (and after it).
            warmup_steps: optimizer steps of linear warmup from 0 to learning_rate.
            lr_decay_steps: optimizer step at which the cosine reaches min_lr (None = trainer.max_steps).
            weight_decay: AdamW weight decay of the matrices (biases and norm gains are not decayed).
            betas: AdamW betas.
            optimizer: adamw | muon. muon: torch.optim.Muon for the matrices inside the blocks (peak
                learning rate muon_lr, no weight decay), AdamW for the embedding, head and gains
                (minigpt.optim); not with FSDP. adamw: AdamW for every parameter, as nanoGPT trains.
            muon_lr: Muon's peak learning rate (the schedule scales it like learning_rate).
            muon_momentum: Muon's momentum (Nesterov).
            compile: torch.compile the GPT (the first steps then take longer while it compiles).
            compile_mode: torch.compile's mode. reduce-overhead replays each step's forward and backward as
                CUDA graphs: one launch instead of hundreds, which pays when the GPU outruns the host
                (small models); the attention kernels, ours or SDPA's, are captured in the graphs.
            time_attention: log the forward and backward time of attention (attn/*) on the logged steps; a
                compiled model runs its timed steps eagerly, one step in ten logged ones (minigpt.timing).
            **model_config: the fields of ``minigpt.model.GPTConfig`` (n_layer, n_head, n_embd, attention,
                ...), under their own names: the config's ``model:`` keys, documented there.
        """
        super().__init__()
        if not learning_rate > 0.0:
            raise ValueError(f"learning_rate={learning_rate}: must be > 0")
        if not 0.0 <= min_lr <= learning_rate:
            raise ValueError(f"min_lr={min_lr}: must lie in [0, learning_rate={learning_rate}]")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps}: must be >= 0")
        if lr_decay_steps is not None and lr_decay_steps <= warmup_steps:
            raise ValueError(
                f"lr_decay_steps={lr_decay_steps}: must be None or > warmup_steps={warmup_steps}"
            )
        if not muon_lr > 0.0:
            raise ValueError(f"muon_lr={muon_lr}: must be > 0")
        if not 0.0 <= muon_momentum < 1.0:
            raise ValueError(f"muon_momentum={muon_momentum}: must lie in [0, 1)")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas={list(betas)}: must be two numbers in [0, 1)")
        unknown = sorted(set(model_config) - {f.name for f in dataclasses.fields(GPTConfig)})
        if unknown:
            raise TypeError(f"GPTModule got {unknown}: neither its arguments nor fields of GPTConfig")
        config = GPTConfig(**model_config)
        self.save_hyperparameters()
        # every field, also those left at their defaults: a checkpoint alone rebuilds the GPT
        self.hparams.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        self.model = GPT(config)
        # Whether each parameter is a matrix (decayed) or not, by every name it has (the tied matrix has two),
        # read now: under FSDP the parameters become 1-D shards, and wrappers insert parts into their names.
        named = self.model.named_parameters(remove_duplicate=False)
        self._is_matrix = {name: p.dim() >= 2 for name, p in named}
        self.attention_backend = config.attention  # resolved on the real device in setup()
        self._base_seed = 0
        self._micro = (-1, 0)  # (global_step, micro-batch within it) of the current batch
        self._grad_norm: torch.Tensor | None = None
        self._loss_sum: torch.Tensor | None = None  # the logged step's earlier micro-batch losses, summed
        self._run_decay_steps: int | None = None  # the decay horizon of the run this one resumes

    # ---- setup ------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device  # the module itself still sits on the CPU here
        self.attention_backend = resolve_backend(self.model.config.attention, device)
        # the run's seed (seed_everything records it in PL_GLOBAL_SEED), not whatever was seeded last
        self._base_seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 for whatever still runs in fp32
        if self.hparams.compile and not getattr(self, "_compiled", False):
            mode = self.hparams.compile_mode
            # in place: the state_dict keys stay those of the plain GPT
            self.model.compile(mode=None if mode == "default" else mode)
            self._compiled = True

    @property
    def uses_cuda_graphs(self) -> bool:
        return bool(self.hparams.compile) and self.hparams.compile_mode in ("reduce-overhead", "max-autotune")

    def mark_step(self) -> None:
        """Tell torch.compile's CUDA graphs that a new step begins: the outputs of earlier replays (losses,
        gradients) are consumed, so their memory may be overwritten."""
        if self.uses_cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def on_fit_start(self) -> None:
        """Record what runs: the resolved attention backend, the device, library versions (in the wandb
        config and the CSV logger's hparams.yaml)."""
        device = self.trainer.strategy.root_device
        info = {
            "attention_backend": self.attention_backend,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch_version": torch.__version__,
            "triton_version": _version("triton"),
            "lightning_version": L.__version__,
            "n_params": self.model.num_params(),
            "flops_per_token": self.model.flops_per_token(),
        }
        for logger in self.loggers:
            logger.log_hyperparams(info)
        rank_zero_info(
            f"GPT of {info['n_params'] / 1e6:.2f} M parameters, "
            f"attention {self.attention_backend} on {info['device']}"
        )

    def configure_callbacks(self) -> list[L.Callback]:
        """The project's callbacks, except those the user configured under trainer.callbacks (Lightning
        would replace the user's with ours: e.g. AttentionTimingCallback(every_n_steps=1) must win)."""
        from minigpt.callbacks import StartupTimer, ThroughputLogger
        from minigpt.timing import AttentionTimingCallback

        wanted: list[L.Callback] = [ThroughputLogger(), StartupTimer()]
        if self.hparams.time_attention:
            wanted.append(AttentionTimingCallback())
        configured = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        return [c for c in wanted if type(c) not in configured]

    # ---- steps ------------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout randomness as a pure function of (seed, micro-step), like the data: see the module doc.
        step, micro = self._micro
        self._micro = (self.global_step, micro + 1 if step == self.global_step else 0)
        micro_step = self.global_step * self.trainer.accumulate_grad_batches + self._micro[1]
        torch.manual_seed(hash((self._base_seed, micro_step)) & (2**63 - 1))
        if self._micro[1] == 0:  # the gradients of earlier micro-batches must survive the next replay
            self.mark_step()

    def on_validation_batch_start(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.mark_step()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        if self.uses_cuda_graphs:  # the loss lives in the graph's memory, which the next replay reuses
            loss = loss.clone()
        # Logged only on the steps the loggers write (Lightning drops the other steps' values anyway): each
        # self.log costs about 2 ms of Python (cProfile, 2-core CPU), and the progress bar and a logged
        # Python float would wait for the GPU. On those steps the loggers read the logged tensors anyway.
        # With gradient accumulation the step's loss is the mean over its micro-batches, as its gradient is.
        if self._logs_this_step():
            micro, accumulate = self._micro[1], self.trainer.accumulate_grad_batches
            total = loss.detach() if micro == 0 else self._loss_sum + loss.detach()
            if micro + 1 < accumulate:
                self._loss_sum = total
            else:
                mean = total / accumulate
                self.log("train/loss", mean, on_step=True, on_epoch=False)
                self.log("loss", mean, on_step=True, on_epoch=False, prog_bar=True, logger=False)
                self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._grad_norm = self._gradient_norm()  # before clipping, as nanoGPT reports it
        if self._logs_this_step():
            self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False)

    def _logs_this_step(self) -> bool:
        """Whether the loggers write this step's metrics (Lightning's rule, less its last-step case; 0 turns
        step logging off)."""
        every = self.trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _gradient_norm(self) -> torch.Tensor:
        """The 2-norm of the whole gradient. Under FSDP each rank holds a shard of it: the squares are
        summed over the ranks, each shard counted once (under DDP every rank holds all of it)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        strategy = self.trainer.strategy
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=strategy.root_device)
        if isinstance(strategy, FSDPStrategy) and self.trainer.world_size > 1:
            squares = norm.float().square()
            torch.distributed.all_reduce(squares)
            world, nodes = self.trainer.world_size, strategy.num_nodes
            norm = (squares / shard_copies(strategy.sharding_strategy.name, world, nodes)).sqrt()
        return norm

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        # Clipped here rather than by Lightning's precision plugin, which refuses fused optimizers even
        # under bf16, where no gradient scaling happens. Reuses the norm computed for logging.
        params = [p for p in self.parameters() if p.grad is not None]
        clip_gradients(params, gradient_clip_val, gradient_clip_algorithm, self._grad_norm)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        _, loss = self.model(x, y)
        # under DDP each rank validates its share of the batches: the mean over all ranks is the metric
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def on_validation_epoch_end(self) -> None:
        # wall time from the launch of the process, next to each val/loss: "how long to reach loss x"
        elapsed = seconds_since_launch()
        self.log("time/since_launch_s", elapsed, on_step=False, on_epoch=True, rank_zero_only=True)

    # ---- optimizer and schedule -------------------------------------------------------------------------

    def decay_steps(self) -> int:
        """The optimizer step at which the cosine reaches min_lr: lr_decay_steps, else that of the run this
        one resumes (a resumed run keeps its schedule when trainer.max_steps changes), else max_steps."""
        decay_steps = self.hparams.lr_decay_steps or self._run_decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps <= 0:
            raise ValueError("lr_decay_steps=None needs trainer.max_steps set (> 0); set one of them")
        return decay_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step`: linear warmup, then cosine down to min_lr."""
        hp = self.hparams
        decay_steps = self.decay_steps()
        if step < hp.warmup_steps:
            return hp.learning_rate * (step + 1) / (hp.warmup_steps + 1)
        if step >= decay_steps:
            return hp.min_lr
        ratio = (step - hp.warmup_steps) / max(1, decay_steps - hp.warmup_steps)
        return hp.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (hp.learning_rate - hp.min_lr)

    def configure_optimizers(self):
        hp = self.hparams
        self.lr_at(0)  # fails early when no decay horizon is known
        # fused AdamW on CUDA, except under fp16 loss scaling, whose unscaling Lightning does for
        # unfused optimizers only
        scaled = getattr(self.trainer.precision_plugin, "scaler", None) is not None
        device_type = "cuda" if self.trainer.strategy.root_device.type == "cuda" and not scaled else "cpu"
        # AdamW decays the matrices (Linear weights, embeddings), not the biases and norm gains; fused: one
        # kernel updates every parameter instead of a handful of kernels per tensor
        optimizer = make_optimizer(
            self.model, hp.optimizer, lambda name: self._is_matrix[built_name(name)], lr=hp.learning_rate,
            weight_decay=hp.weight_decay, betas=tuple(hp.betas), muon_lr=hp.muon_lr,
            muon_momentum=hp.muon_momentum, fused=device_type == "cuda",
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: self.lr_at(s) / hp.learning_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- checkpoints ------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The model shape is in checkpoint["hyper_parameters"]; with the tokenizer a checkpoint alone samples.
        from minigpt.tokenizer import tokenizer_to_dict

        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            checkpoint["tokenizer"] = tokenizer_to_dict(datamodule.tokenizer)
        checkpoint["lr_decay_steps"] = self.decay_steps()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._run_decay_steps = checkpoint.get("lr_decay_steps")  # absent in older checkpoints: max_steps
        if self._trainer is None or self._trainer.state.fn != "fit":  # no schedule to tell of
            return
        max_steps = self._trainer.max_steps
        if self._run_decay_steps and not self.hparams.lr_decay_steps and max_steps != self._run_decay_steps:
            rank_zero_info(
                f"trainer.max_steps={max_steps}: the learning rate keeps the run's schedule, which decays "
                f"until step {self._run_decay_steps}; --model.lr_decay_steps sets another"
            )


# Module names that wrappers (FSDP, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def built_name(name: str) -> str:
    """A parameter's name as the GPT was built, without the parts that wrappers inserted."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def shard_copies(sharding_strategy: str, world_size: int, num_nodes: int) -> int:
    """How many ranks hold each gradient shard under an FSDP sharding strategy: FULL_SHARD and
    SHARD_GRAD_OP split the gradient over all ranks, NO_SHARD keeps it whole on every rank, the HYBRID
    strategies shard within a node and replicate across nodes."""
    if sharding_strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
        return 1
    if sharding_strategy == "NO_SHARD":
        return world_size
    if sharding_strategy in ("HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"):
        return num_nodes
    raise ValueError(f"FSDP sharding_strategy {sharding_strategy!r} is not supported by the gradient norm")


def clip_gradients(
    params: list[torch.Tensor], clip_val: float | None, algorithm: str | None, total_norm: torch.Tensor
) -> None:
    """Clip the gradients of `params` by value, or by norm using their already computed `total_norm`."""
    if not clip_val:
        return
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
    else:
        torch.nn.utils.clip_grads_with_norm_(params, clip_val, total_norm)


_IMPORTED_AT = time.time()


def seconds_since_launch() -> float:
    """Seconds since this process started (Linux: from /proc; elsewhere: since this module was imported,
    which misses the interpreter's start and the first imports)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _IMPORTED_AT


def _cpu_name() -> str:
    return platform.processor() or platform.machine() or "cpu"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "none"
