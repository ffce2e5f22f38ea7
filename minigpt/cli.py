"""The training command line: ``python train.py --config configs/<name>.yaml [--section.key value ...]``
(``train.py`` at the repository root, ``python -m minigpt.cli`` or the ``minigpt-train`` script: all the
same command).

A LightningCLI over ``GPTModule`` (the ``model:`` section) and ``TextDataModule`` (``data:``), with the
Trainer's arguments under ``trainer:``; ``--print_config`` shows every key with its value. One command, no
subcommand: it fits. ``model.block_size`` sets ``data.block_size``; the tokenizer sets
``model.vocab_size``.

Runs on disk. Everything of one run lives in ``<out_dir>/<run_name>/`` (run_name defaults to
``<config file name>-<attention backend>``):

    config.yaml          the full config of the run
    metrics.csv          every logged metric with its step (Lightning's CSVLogger; a step can span rows)
    checkpoints/         last.ckpt (each validation, and the end) and the best by val/loss (best-step=N.ckpt)
    wandb/               the wandb run (offline unless wandb credentials exist or --wandb_mode online)

``--ckpt_path last`` resumes this run from its ``last.ckpt`` and, with the same settings, continues the same
trajectory (same batches, same dropout masks; see ``TextDataModule.start_index`` and
``GPTModule.decay_steps`` for a resume with other ones); ``--ckpt_path <file>`` starts from any checkpoint.
"""

import csv
import netrc
import os
import shutil
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from minigpt.attention import resolve_backend
from minigpt.data import TextDataModule
from minigpt.module import GPTModule

# The run folder is ours to manage (see RunCSVLogger and TrainCLI.before_instantiate_classes).
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")

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
}


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


class TrainCLI(LightningCLI):
    """LightningCLI with the run options of this project and the run folder layout of the module doc."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None,
            help="Run folder name under out_dir (default: <config file name>-<attention backend>).",
        )
        parser.add_argument("--group", type=str | None, default=None, help="wandb group of the run.")
        parser.add_argument("--out_dir", type=str, default="runs", help="Folder of the run folders.")
        parser.add_argument(
            "--wandb_mode", type=str, default="auto", choices=WANDB_MODES,
            help="auto: online when wandb credentials exist, else offline; disabled: no wandb.",
        )
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None,
            help="Checkpoint to start from: a file, or 'last' for this run's checkpoints/last.ckpt.",
        )
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Start a new run in a run folder that already holds one, deleting its checkpoints.",
        )
        parser.link_arguments("model.block_size", "data.block_size")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse as LightningCLI does, refusing values for the derived keys (DERIVED_KEYS), on the command
        line or in a config file."""
        argv = sys.argv[1:] if args is None else args
        for arg in argv if isinstance(argv, (list, tuple)) else ():
            key = str(arg).split("=", 1)[0].removeprefix("--")
            if key in DERIVED_KEYS:
                parser.error(f"--{key} cannot be set: {DERIVED_KEYS[key]}")
        super().parse_arguments(parser, args)
        for path in self.config.get("config") or []:
            content = yaml.safe_load(path.get_content()) if hasattr(path, "get_content") else None
            for key, source in DERIVED_KEYS.items():
                section, name = key.split(".")
                if isinstance(content, dict) and name in (content.get(section) or {}):
                    parser.error(f"{path}: {key} cannot be set: {source}")

    def before_instantiate_classes(self) -> None:
        """Settle the run folder and the checkpoint before any data or model work."""
        cfg = self.config
        self.attention_backend = settle_device_defaults(cfg)
        if cfg.run_name is None:
            configs = cfg.get("config") or []
            stem = Path(str(configs[-1])).stem if configs else "minigpt"
            cfg.run_name = f"{stem}-{self.attention_backend}"
        self.run_dir = Path(cfg.out_dir) / cfg.run_name

        self.ckpt_path = None
        checkpoints = self.run_dir / "checkpoints"
        if cfg.ckpt_path == "last":
            last = checkpoints / "last.ckpt"
            if not last.is_file():
                runs = sorted(p.name for p in Path(cfg.out_dir).glob("*"))
                self.parser.error(
                    f"--ckpt_path last: no checkpoint at {last}; train this run first, or check --run_name "
                    f"and --out_dir (run folders in {cfg.out_dir}: {runs})"
                )
            self.ckpt_path = str(last)
        elif cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
            self.parser.error(f"--ckpt_path {cfg.ckpt_path}: no such checkpoint file")
        else:
            self.ckpt_path = cfg.ckpt_path
        # Whether the run continues from one of its own checkpoints, moved with its folder or not.
        self.resumes_own_run = self.ckpt_path is not None and Path(self.ckpt_path).resolve().parent == (
            checkpoints.resolve()
        )
        if not self.resumes_own_run and rank_zero_only.rank == 0 and (
            checkpoints.exists() or (self.run_dir / "metrics.csv").exists()
        ):
            # A new run in an old run's folder (from scratch, or from another run's checkpoint) would replace
            # its checkpoints and metrics: only when asked to. Decided by rank zero alone: under DDP the
            # other ranks start once rank zero has begun writing.
            if not cfg.overwrite:
                self.parser.error(
                    f"{self.run_dir} already holds a run: pass --ckpt_path last to continue it, "
                    "--run_name NAME to start another beside it, or --overwrite true to replace it"
                )
            rank_zero_warn(f"--overwrite: replacing the run in {self.run_dir}")
            (self.run_dir / "metrics.csv").unlink(missing_ok=True)
            shutil.rmtree(checkpoints, ignore_errors=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The Trainer with this run's loggers (CSV + wandb) and checkpoints, in the run folder."""
        cfg = self.config
        trainer_cfg = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        if trainer_cfg.get("logger") in (None, True):
            resume_step = None
            if self.ckpt_path:  # mmap: reads the step without loading the tensors
                ckpt = torch.load(self.ckpt_path, map_location="cpu", mmap=True, weights_only=False)
                resume_step = ckpt.get("global_step")
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
        callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        if trainer_cfg.get("enable_checkpointing") is not False:
            callbacks.append(RunCheckpoint(self.run_dir / "checkpoints", own_run=self.resumes_own_run))
        if trainer_cfg.get("default_root_dir") is None:
            trainer_cfg["default_root_dir"] = str(self.run_dir)
        return self._instantiate_trainer(trainer_cfg, callbacks)

    def _wandb_run_id(self) -> str | None:
        """The id of this run folder's latest wandb run, so that a resumed run logs into the same one."""
        # each wandb run folder holds run-<id>.wandb (the folder name may carry a -N suffix, so not from it)
        logs = sorted((self.run_dir / "wandb" / "latest-run").glob("run-*.wandb"))
        return logs[0].stem.removeprefix("run-") if logs else None


class RunCheckpoint(ModelCheckpoint):
    """The run's checkpoints in `dirpath`: `last.ckpt`, written after every validation and when training
    ends, and the best by val/loss, `best-step=N.ckpt`. Each file is replaced in place, never versioned
    (`last-v1.ckpt` would leave `last.ckpt` behind, and `--ckpt_path last` would go back to it).

    own_run: the run resumes from a checkpoint of this folder. Lightning forgets which file is the best
    when the folder's absolute path has changed since the checkpoint (a run folder copied to another
    machine, a new --out_dir), and would then keep two best files; the paths are carried over instead."""

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
    """Parse `args` (default: the command line), train, and return the Trainer."""
    cli = TrainCLI(
        GPTModule,
        TextDataModule,
        run=False,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=1337,
        save_config_kwargs={"overwrite": True},  # a resumed run rewrites config.yaml in its folder
        auto_configure_optimizers=False,  # GPTModule configures its own optimizer and schedule
        parser_kwargs={"prog": "train.py", "description": "Train a GPT (minigpt)."},
        args=args,
    )
    failed = True
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.ckpt_path)
        failed = False
    finally:
        finish_wandb(failed)
    return cli.trainer


if __name__ == "__main__":
    main()
