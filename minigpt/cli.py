"""The training command line (``train.py`` at the repository root, ``python -m minigpt.cli`` and the
``minigpt-train`` script are the same command):

    python train.py                                  trains the default config of this machine
    python train.py --config configs/<name>.yaml [--section.key value ...]
    python train.py fit ...                          the same, in LightningCLI's subcommand spelling
    python train.py validate --ckpt_path FILE        val loss and perplexity of a checkpoint

A LightningCLI over ``GPTModule`` (the ``model:`` section) and ``TextDataModule`` (``data:``), with the
Trainer's arguments under ``trainer:``; ``--print_config`` shows every key with its value. Without
``--config`` it takes ``configs/shakespeare_char.yaml`` on a CUDA GPU and ``configs/shakespeare_cpu.yaml``
elsewhere; the first line it prints names the config, the attention backend and the run folder.
``model.block_size`` sets ``data.block_size``; the tokenizer sets ``model.vocab_size``.

Runs on disk. Everything of one run lives in ``<trainer.default_root_dir>/<run_name>/`` (``runs/`` and
``<config file name>-<attention backend>`` unless set):

    config.yaml          the full config of the run
    metrics.csv          every logged metric with its step (Lightning's CSVLogger; a step can span rows)
    checkpoints/         last.ckpt (each validation, and the end) and the best by val/loss (best-step=N.ckpt)
    wandb/               the wandb run (offline unless wandb credentials exist or --wandb_mode online)

Each checkpoint is written to a temporary file beside it and renamed into place, so a file named ``.ckpt``
is always complete. ``--ckpt_path last`` resumes this run from its newest checkpoint (``last.ckpt``, or the
best one where that is newer) and, with the same settings, continues the same trajectory (same batches,
same dropout masks; see ``TextDataModule.start_index`` and ``GPTModule.decay_steps`` for a resume with
other ones); ``--ckpt_path <file>`` starts from any checkpoint. A run folder without a checkpoint (a run
stopped before its first validation) starts over with the same command.

Errors. Before the first step the command parses the arguments, builds the model, builds or opens the
token cache and opens the checkpoint. A ``ValueError`` raised on the way is a user's mistake (a bad value,
a data source that cannot be read, an unknown tokenizer, a checkpoint that does not fit): it is printed as
one line, which names the value and what is allowed, and the command exits with status 2. Errors raised
once training runs keep their tracebacks.
"""

import contextlib
import csv
import math
import netrc
import os
import shlex
import shutil
import sys
import time
import warnings
from argparse import ArgumentError
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from minigpt.attention import resolve_backend
from minigpt.data import TextDataModule
from minigpt.model import GPT, GPTConfig
from minigpt.module import GPTModule

# The run folder is ours to manage (see RunCSVLogger and TrainCLI.before_instantiate_classes).
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# Validation restores a checkpoint's weights only; training does pass the callback that wrote it.
warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create")
# main() hands LightningCLI the command line itself, less the subcommand.
warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")

STAGES = ("fit", "validate")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GPU_CONFIG, CPU_CONFIG = CONFIGS / "shakespeare_char.yaml", CONFIGS / "shakespeare_cpu.yaml"
# A training run expected to take longer than this on a CPU is announced with a warning before it starts.
LONG_ON_CPU_S = 3600
WANDB_MODES = ("auto", "online", "offline", "disabled")

# Keys the parser fills in from others (the links in TrainCLI.add_arguments_to_parser): a value given for
# them would be dropped without a word, so giving one is an error.
DERIVED_KEYS = {
    "data.block_size": "model.block_size sets it",
    "model.vocab_size": "the tokenizer (data.tokenizer) sets it",
}

# Trainer settings that differ from Lightning's defaults (a config's `trainer:` section overrides them).
TRAINER_DEFAULTS = {
    "precision": None,  # bf16-mixed on a GPU, 32-true on the CPU: settled once the accelerator is known
    "max_steps": 5000,
    "val_check_interval": 250,  # training batches between validations (optimizer steps x accumulation)
    "check_val_every_n_epoch": None,  # the training stream is endless: count steps, not epochs
    "log_every_n_steps": 10,
    "gradient_clip_val": 1.0,
    "default_root_dir": "runs",  # the folder of the run folders
}


def default_config() -> Path:
    """The config `python train.py` trains without --config: the GPU one where CUDA is, else the CPU one."""
    return GPU_CONFIG if torch.cuda.is_available() else CPU_CONFIG


def shown(path: str | Path) -> str:
    """A path as a user would type it: relative to the working folder when it lies below it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _option(argv: list[str], name: str) -> str | None:
    """The value of option `name` on a command line (`name VALUE` or `name=VALUE`; the last one given)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def _first_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).strip().splitlines())
    return text or type(error).__name__


@contextlib.contextmanager
def user_errors(prog: str):
    """Turn a user's mistake found before training (see the module doc) into one line on stderr and exit
    status 2, the status argparse gives a bad command line."""
    try:
        yield
    except (ArgumentError, ValueError) as e:
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def read_checkpoint(path: str | Path) -> dict:
    """A training checkpoint's contents, its tensors memory-mapped rather than read; ValueError when the
    file is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as e:  # a truncated or foreign file: whatever torch's reader raises
        raise ValueError(f"--ckpt_path {path}: not a readable checkpoint ({_first_line(e)})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise ValueError(f"--ckpt_path {path}: not a checkpoint written by train.py")
    return ckpt


def newest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """(path, step) of the checkpoint of the latest step in a run's checkpoint folder, last.ckpt or
    best-step=N.ckpt (last.ckpt on a tie); None when it holds none that can be read."""
    found = []
    for path in folder.glob("*.ckpt"):
        try:
            step = int(read_checkpoint(path)["global_step"])
        except (ValueError, KeyError):  # cut short by a kill under an earlier, non-atomic writer
            continue
        found.append((step, path.name == "last.ckpt", path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def wandb_has_credentials() -> bool:
    """Whether wandb can log in without asking: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """`auto` -> WANDB_MODE if set, else online with credentials, offline without."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb_mode={mode!r}; allowed: {WANDB_MODES}")
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    return "online" if wandb_has_credentials() else "offline"


def settle_device_defaults(cfg) -> str:
    """Fill in what depends on the accelerator: the precision (bf16-mixed on a GPU, 32-true on the CPU,
    unless the config sets one); returns the attention backend that `model.attention` means there."""
    accelerator = str(cfg.trainer.get("accelerator") or "auto")
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if cfg.trainer.get("precision") is None:
        cfg.trainer.precision = "bf16-mixed" if on_gpu else "32-true"
    return resolve_backend(cfg.model.attention, "cuda" if on_gpu else "cpu")


def seconds_per_step_on_cpu(model: GPT, tokens_per_step: int) -> float:
    """About how long one training step of `model` over `tokens_per_step` tokens takes on this CPU: one
    forward and backward pass over about 512 tokens in sequences of the model's length (at most 512),
    timed and scaled (the optimizer step left out)."""
    T = min(model.config.block_size, 512)
    x = torch.randint(model.config.vocab_size, (max(1, 512 // T), T))
    with torch.random.fork_rng(), torch.enable_grad():  # training seeds its own randomness per step
        for rows in (1, x.size(0)):  # the first pass warms the allocator up; the second is timed
            start = time.perf_counter()
            _, loss = model(x[:rows], x[:rows])
            loss.backward()
            elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed * tokens_per_step / x.numel()


def format_duration(seconds: float) -> str:
    """Hours, for the CPU warning (given only for runs over LONG_ON_CPU_S)."""
    return f"{seconds / 3600:.0f} h" if seconds >= 10 * 3600 else f"{seconds / 3600:.1f} h"


class TrainCLI(LightningCLI):
    """LightningCLI with this project's run options, the default config of the machine, the run folder
    layout of the module doc, and `validate` taking its settings from the checkpoint.

    stage: "fit" or "validate", what main() does with the classes this builds."""

    def __init__(self, *args, stage: str = "fit", **kwargs):
        self.stage = stage
        self.default_config: Path | None = None  # the config picked for a command line without --config
        self.ckpt_path: str | None = None  # the checkpoint file to start from or validate, resolved
        self.checkpoint: dict | None = None  # its contents, tensors memory-mapped
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="Run folder name under trainer.default_root_dir (default: <config file name>-<attention "
            "backend>).",
        )
        parser.add_argument("--group", type=str | None, default=None, help="wandb group of the run.")
        parser.add_argument(
            "--wandb_mode", type=str, default="auto", choices=WANDB_MODES,
            help="auto: online when wandb credentials exist, else offline; disabled: no wandb.",
        )
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Checkpoint to start from (validate: to validate): a file, or 'last' for this run's newest.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Start a new run in a run folder that already holds one, deleting its checkpoints.",
        )
        parser.link_arguments("model.block_size", "data.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as LightningCLI does, with the machine's default config when none is given, refusing values
        for the derived keys (DERIVED_KEYS), on the command line or in a config file. For validate, the
        checkpoint's model and data settings are the defaults."""
        argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        given_config = "-c" in argv or _option(argv, "--config") is not None
        validates_file = self.stage == "validate" and _option(argv, "--ckpt_path") not in (None, "last")
        if not given_config and not validates_file:
            self.default_config = default_config()
            argv = ["--config", str(self.default_config), *argv]
        for arg in argv:
            key = arg.split("=", 1)[0].removeprefix("--")
            if key in DERIVED_KEYS:
                parser.error(f"--{key} cannot be set: {DERIVED_KEYS[key]}")
        super().parse_arguments(parser, argv)
        for path in self.config.get("config") or []:
            content = yaml_content(path)
            for key, source in DERIVED_KEYS.items():
                section, name = key.split(".")
                if isinstance(content, dict) and name in (content.get(section) or {}):
                    parser.error(f"{path}: {key} cannot be set: {source}")
        if self.stage == "validate":
            self._settle_checkpoint()
            parser.set_defaults(checkpoint_settings(self.checkpoint, parser))
            super().parse_arguments(parser, argv)
        self.settle()

    def settle(self) -> None:
        """What follows from the parsed config, announced in the first line printed: the device defaults,
        the attention backend, the checkpoint and the run folder."""
        cfg = self.config
        self.attention_backend = settle_device_defaults(cfg)
        if self.stage == "validate":
            self._announce(
                f"train.py validate: {shown(self.ckpt_path)} (step {self.checkpoint.get('global_step')}), "
                f"attention {self.attention_backend}"
            )
            return
        self._settle_checkpoint()
        configs = [shown(str(c)) for c in cfg.get("config") or []]
        config = " + ".join(configs) or "no config file"
        if self.default_config is not None:
            where = "on a CUDA GPU" if self.default_config == GPU_CONFIG else "without CUDA"
            config += f" (the default {where})"
        run = shown(self.run_dir)
        self._announce(f"train.py: {config}, attention {self.attention_backend}, run folder {run}")
        if self.ckpt_path is not None:
            self._announce(f"starting from {shown(self.ckpt_path)} (step {self.checkpoint['global_step']})")

    def before_instantiate_classes(self) -> None:
        """Refuse, before any data or model work, to start a new run where a run already is, unasked."""
        if self.stage != "fit":
            return
        checkpoints = self.run_dir / "checkpoints"
        # Whether the run continues from one of its own checkpoints, moved with its folder or not.
        self.resumes_own_run = self.ckpt_path is not None and Path(self.ckpt_path).resolve().parent == (
            checkpoints.resolve()
        )
        # Decided by rank zero alone: under DDP the other ranks start once rank zero has begun writing.
        new_run = rank_zero_only.rank == 0 and not self.resumes_own_run
        if new_run and newest_checkpoint(checkpoints) is not None:
            # A new run in an old run's folder (from scratch, or from another run's checkpoint) would replace
            # its checkpoints and metrics: only when asked to.
            if not self.config.overwrite:
                self.parser.error(
                    f"{shown(self.run_dir)} already holds a run: pass --ckpt_path last to continue it, "
                    "--run_name NAME to start another beside it, or --overwrite true to replace it"
                )
            rank_zero_warn(f"--overwrite: replacing the run in {shown(self.run_dir)}")

    def _prepare_run_dir(self) -> None:
        """Make the run folder ready for training, once nothing is left to refuse: a new run (or one that
        never wrote a checkpoint: it starts over) leaves no metrics or checkpoints of an earlier one."""
        if rank_zero_only.rank != 0:
            return
        checkpoints = self.run_dir / "checkpoints"
        if not self.resumes_own_run:
            if newest_checkpoint(checkpoints) is None and (
                checkpoints.exists() or (self.run_dir / "metrics.csv").exists()
            ):
                self._announce(f"{shown(self.run_dir)} holds no checkpoint yet: its run starts over")
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
            shutil.rmtree(checkpoints, ignore_errors=True)
        for stale in checkpoints.glob("*.tmp"):  # a checkpoint write cut short by a kill
            stale.unlink()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _settle_checkpoint(self) -> None:
        """Resolve --ckpt_path to a file (self.ckpt_path) and read it (self.checkpoint); for fit, also name
        the run folder (self.run_dir)."""
        cfg = self.config
        if self.stage == "fit" or cfg.ckpt_path == "last":
            if cfg.run_name is None:
                configs = cfg.get("config") or []
                stem = Path(str(configs[-1])).stem if configs else "minigpt"
                cfg.run_name = f"{stem}-{settle_device_defaults(cfg)}"
            self.run_dir = Path(cfg.trainer.default_root_dir) / cfg.run_name
        if cfg.ckpt_path == "last":
            newest = newest_checkpoint(self.run_dir / "checkpoints")
            if newest is None:
                root = Path(cfg.trainer.default_root_dir)
                runs = sorted(p.name for p in root.glob("*") if p.is_dir())
                self.parser.error(
                    f"--ckpt_path last: no checkpoint in {shown(self.run_dir / 'checkpoints')}; train this "
                    "run first, or check --run_name and --trainer.default_root_dir (run folders in "
                    f"{shown(root)}: {runs})"
                )
            self.ckpt_path = str(newest[0])
        elif cfg.ckpt_path is not None:
            if not Path(cfg.ckpt_path).is_file():
                self.parser.error(f"--ckpt_path {cfg.ckpt_path}: no such checkpoint file")
            self.ckpt_path = cfg.ckpt_path
        elif self.stage == "validate":
            self.parser.error("validate needs --ckpt_path: a checkpoint file, or last for this run's newest")
        self.checkpoint = read_checkpoint(self.ckpt_path) if self.ckpt_path is not None else None

    @staticmethod
    def _announce(line: str) -> None:
        if rank_zero_only.rank == 0:
            print(line, flush=True)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer: for fit with this run's loggers (CSV + wandb) and checkpoints, in the run folder;
        for validate writing nothing."""
        cfg = self.config
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if self.stage == "validate":
            self.save_config_callback = None
            trainer_cfg.update(logger=False, enable_checkpointing=False)
            return self._instantiate_trainer(trainer_cfg, callbacks)
        if trainer_cfg.get("logger") in (None, True):
            resume_step = self.checkpoint["global_step"] if self.checkpoint else None
            loggers = [RunCSVLogger(self.run_dir, resume_step)]
            self.wandb_mode = resolve_wandb_mode(cfg.wandb_mode)
            if self.wandb_mode != "disabled":
                os.environ["WANDB_MODE"] = self.wandb_mode  # never ask for a login, never reach out offline
                os.environ.setdefault("WANDB_SILENT", "true")
                wandb_logger = WandbLogger(
                    project="minigpt", name=cfg.run_name, save_dir=str(self.run_dir), group=cfg.group,
                    id=self._wandb_run_id() if self.resumes_own_run else None, mode=self.wandb_mode,
                )
                wandb_logger._wandb_init.pop("anonymous", None)  # deprecated in wandb: it warns if passed
                loggers.append(wandb_logger)
            trainer_cfg["logger"] = loggers
        if trainer_cfg.get("enable_checkpointing") is not False:
            callbacks.append(RunCheckpoint(self.run_dir / "checkpoints", own_run=self.resumes_own_run))
            if not trainer_cfg.get("plugins"):
                trainer_cfg["plugins"] = [AtomicCheckpointIO()]
        trainer_cfg["default_root_dir"] = str(self.run_dir)  # whatever else Lightning writes goes there too
        return self._instantiate_trainer(trainer_cfg, callbacks)

    def _wandb_run_id(self) -> str | None:
        """The id of this run folder's latest wandb run, so that a resumed run logs into the same one."""
        # each wandb run folder holds run-<id>.wandb (the folder name may carry a -N suffix, so not from it)
        logs = sorted((self.run_dir / "wandb" / "latest-run").glob("run-*.wandb"))
        return logs[0].stem.removeprefix("run-") if logs else None

    # ---- before the first step ----------------------------------------------------------------------

    def check_before_training(self) -> None:
        """Find what can be wrong with the user's settings before any step: build (or open) the token
        cache, check that the checkpoint fits the data and the model, and, on a CPU, warn when training would
        take hours. Raises ValueError."""
        datamodule, module, trainer = self.datamodule, self.model, self.trainer
        if rank_zero_only.rank == 0:  # the other ranks of a multi-process run wait for this cache in fit
            datamodule.setup()
        if self.checkpoint is not None:
            state = self.checkpoint.get(type(datamodule).__qualname__)
            if state:
                datamodule.load_state_dict(state)  # raises for another tokenizer, seed or text
            check_model_fits(self.ckpt_path, self.checkpoint, module.model.config)
        if self.stage != "fit":
            return
        resumed_decay = (self.checkpoint or {}).get("lr_decay_steps")
        max_steps = trainer.max_steps
        no_end = max_steps is None or max_steps <= 0
        if module.hparams.lr_decay_steps is None and not resumed_decay and no_end:
            raise ValueError(
                f"trainer.max_steps={max_steps}: the learning-rate schedule needs an end; set "
                "trainer.max_steps or model.lr_decay_steps"
            )
        on_cpu = trainer.strategy.root_device.type == "cpu"
        if on_cpu and max_steps and max_steps > 0 and rank_zero_only.rank == 0:
            tokens = datamodule.batch_size * module.model.config.block_size * trainer.accumulate_grad_batches
            steps = max_steps - ((self.checkpoint or {}).get("global_step") or 0)
            seconds = seconds_per_step_on_cpu(module.model, tokens) * steps
            if seconds > LONG_ON_CPU_S:
                configs = self.config.get("config") or []
                what = shown(str(configs[-1])) if configs else "this config"
                print(
                    f"train.py: warning: {what} is sized for a GPU: its {steps} steps would take about "
                    f"{format_duration(seconds)} on this CPU. {shown(CPU_CONFIG)} trains in minutes on a "
                    f"CPU: python train.py --config {shown(CPU_CONFIG)}",
                    file=sys.stderr, flush=True,
                )

    # ---- the two stages ----------------------------------------------------------------------------

    def fit(self) -> L.Trainer:
        self._prepare_run_dir()
        failed = True
        try:
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.ckpt_path)
            failed = False
        finally:
            finish_wandb(failed)
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if rank_zero_only.rank == 0 and self.trainer.checkpoint_callback is not None and last.is_file():
            command = ["python", "-m", "minigpt.sample", "--ckpt", shown(last)]
            if self.datamodule.source == "shakespeare":
                command += ["--prompt", "Romeo:"]
            print(f"sample from this run: {shlex.join(command)}", flush=True)
        return self.trainer

    def validate(self) -> L.Trainer:
        (results,) = self.trainer.validate(
            self.model, datamodule=self.datamodule, ckpt_path=self.ckpt_path, verbose=False
        )
        loss, data = results["val/loss"], self.datamodule
        self._announce(
            f"val/loss {loss:.4f}, perplexity {math.exp(loss):.2f} ({shown(self.ckpt_path)}, step "
            f"{self.checkpoint['global_step']}; {data.val_batches} batches of {data.batch_size} x "
            f"{data.block_size} tokens from the held-out {data.val_fraction:.0%} of {data.source})"
        )
        return self.trainer


def yaml_content(path):
    """The parsed content of a config file given to --config (None if it has none)."""
    import yaml

    return yaml.safe_load(path.get_content()) if hasattr(path, "get_content") else None


def checkpoint_settings(checkpoint: dict, parser: LightningArgumentParser) -> dict:
    """The model and data settings a checkpoint was trained with, as parser defaults (`model.n_layer`...),
    for validate; compile off (a validation pass does not repay compiling) and the attention backend this
    machine's (`auto`: the weights are the same whichever computed them in training)."""
    settings = {f"model.{k}": v for k, v in checkpoint["hyper_parameters"].items()}
    data = checkpoint.get("datamodule_hyper_parameters")
    if data is None:  # written before TextDataModule saved its arguments: what its state holds
        state = checkpoint.get(TextDataModule.__qualname__, {})
        data = {k: state[k] for k in ("source", "tokenizer", "seed") if k in state}
    settings.update({f"data.{k}": v for k, v in data.items()})
    settings["model.compile"] = False
    settings["model.attention"] = "auto"
    for key in DERIVED_KEYS:
        settings.pop(key, None)
    known = set(parser.get_defaults().keys())
    return {k: v for k, v in settings.items() if k in known}


def check_model_fits(path: str, checkpoint: dict, config: GPTConfig) -> None:
    """ValueError unless the checkpoint's GPT has the shape of `config` (attention backend and dropout may
    differ: neither is a weight)."""
    hp = checkpoint["hyper_parameters"]
    saved = GPTConfig(**{f.name: hp[f.name] for f in fields(GPTConfig) if f.name in hp})
    for f in fields(GPTConfig):
        ours, theirs = getattr(config, f.name), getattr(saved, f.name)
        if f.name not in ("attention", "dropout") and ours != theirs:
            raise ValueError(
                f"--ckpt_path {path}: its model has {f.name}={theirs!r}, this config "
                f"model.{f.name}={ours!r}; pass --model.{f.name} {theirs}, or the checkpoint's config"
            )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to `<name>.tmp` beside it and renames it into place: a kill mid-write leaves
    the previous file whole and a `.tmp` that the next start removes. (Lightning's own writer stages the file
    in the system temp folder, where a kill leaves it, and copies it across file systems, which a kill can
    cut short.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options={storage_options!r}: not supported by {type(self).__name__}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class RunConfig(SaveConfigCallback):
    """Saves config.yaml in the run folder (LightningCLI's callback) and gives the loggers (the wandb run
    config) the settings that the modules' own hyperparameters leave out: the trainer section and the run
    options. With the model's and the data module's hyperparameters, which Lightning logs, that is the
    whole resolved config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        params = {k: v for k, v in config.items() if k not in ("model", "data")}
        for logger in trainer.loggers:
            logger.log_hyperparams(params)


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints in `dirpath`: `last.ckpt`, written after every validation and when training
    ends, and the best by val/loss, `best-step=N.ckpt`. Each file is replaced in place, never versioned
    (`last-v1.ckpt` would leave `last.ckpt` behind, and `--ckpt_path last` would go back to it).

    own_run: the run resumes from a checkpoint of this folder. Lightning forgets which file is the best
    when the folder's absolute path has changed since the checkpoint (a run folder copied to another
    machine, another --trainer.default_root_dir), and would then keep two best files; the paths are
    carried over instead."""

    def __init__(self, dirpath: str | Path, own_run: bool = False):
        super().__init__(
            dirpath=dirpath, filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1,
            save_last=True, enable_version_counter=False,
        )
        self.own_run = own_run

    def load_state_dict(self, state_dict: dict) -> None:
        saved_dir = state_dict.get("dirpath")
        if self.own_run and saved_dir and self.dirpath and saved_dir != self.dirpath:

            def here(path):
                if not path or Path(path).parent != Path(saved_dir):
                    return path
                return str(Path(self.dirpath) / Path(path).name)

            state_dict = {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": here(state_dict.get("best_model_path")),
                "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                "last_model_path": here(state_dict.get("last_model_path")),
                "best_k_models": {here(p): v for p, v in state_dict.get("best_k_models", {}).items()},
            }
        super().load_state_dict(state_dict)

    @property
    def state_key(self) -> str:
        # The key of this callback's state in a checkpoint: ModelCheckpoint's, so that checkpoints written by
        # a plain ModelCheckpoint (and by this class) restore into either.
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2.6 writes last.ckpt only at validations that also write a best checkpoint: a run killed
        # after a validation that did not improve would resume from an older step.
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning writes last.ckpt at the end only if it never wrote one: the steps after the last
        # validation (max_steps not a multiple of val_check_interval) would be lost to sampling and resuming.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger writing `<run>/metrics.csv`, which keeps, when a run resumes at step
    `resume_step`, the rows of the steps before it (Lightning's own deletes the file)."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None):
        super().__init__(save_dir, name="", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        keys, rows = [], []
        if self._resume_step is not None and path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") and int(r["step"]) < self._resume_step]
        experiment = super().experiment  # removes metrics.csv
        if keys:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            experiment.metrics_keys = sorted(keys)  # later rows append under this header
        return experiment


def finish_wandb(failed: bool = False) -> None:
    """Close the wandb run (Lightning leaves it open), so its files are complete and a next run in the
    same process starts a new one rather than reusing it."""
    wandb = sys.modules.get("wandb")  # never imported when wandb is disabled
    if wandb is None or wandb.run is None:
        return
    offline, folder = wandb.run.settings.mode == "offline", Path(wandb.run.dir).parent  # dir: <run>/files
    wandb.finish(exit_code=1 if failed else 0)
    if offline:
        rank_zero_info(f"wandb: offline run saved; upload it with: wandb sync {folder}")


def main(args: list[str] | None = None) -> L.Trainer:
    """Parse `args` (default: the command line), fit or validate, and return the Trainer."""
    argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
    with user_errors("train.py"):
        stage = "fit"
        if argv and not argv[0].startswith("-"):  # a subcommand, as LightningCLI's users write it
            if argv[0] not in STAGES:
                raise ValueError(f"subcommand {argv[0]!r}: allowed: {' | '.join(STAGES)} (none: fit)")
            stage = argv.pop(0)
        cli = TrainCLI(
            GPTModule,
            TextDataModule,
            run=False,
            stage=stage,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=1337,
            save_config_callback=RunConfig,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml in its folder
            auto_configure_optimizers=False,  # GPTModule configures its own optimizer and schedule
            # errors raise, and user_errors prints them as one line (jsonargparse prints the whole usage)
            parser_kwargs={
                "prog": "train.py", "exit_on_error": False,
                "description": "Train a GPT (minigpt): python train.py [fit | validate] [--config FILE] "
                "[--section.key value ...]. Without --config: configs/shakespeare_char.yaml on a CUDA GPU, "
                "configs/shakespeare_cpu.yaml elsewhere.",
            },
            args=argv,
        )
        cli.check_before_training()
    return cli.validate() if stage == "validate" else cli.fit()


if __name__ == "__main__":
    main()
