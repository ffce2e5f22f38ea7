"""Training end to end through train.py: loss, logged metrics (CSV and wandb), resume, CLI errors.

The CPU tests train configs/tiny.yaml in-process on a 300 K character slice of the built-in corpus, in
temporary folders. One 30-step run serves several tests.
"""

import csv
import json
import math
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minigpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def read_metric(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric in a run's metrics.csv (the last value when a step repeats)."""
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


def wandb_records(path: Path):
    """The records of a .wandb file: wandb's log format is LevelDB's (32 KiB blocks of chunks, each with a
    7-byte header: checksum, length, type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


@pytest.fixture(scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a busy machine extra threads make each op far slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    from minigpt.data import shakespeare_text

    root = tmp_path_factory.mktemp("train")
    (root / "corpus.txt").write_text(shakespeare_text()[:300_000])
    return root


def tiny_args(workdir: Path, *extra: str) -> list[str]:
    return [
        "--config", TINY,
        "--data.source", str(workdir / "corpus.txt"),
        "--data.cache_dir", str(workdir / "data"),
        "--trainer.default_root_dir", str(workdir / "runs"),
        "--wandb_mode", "offline",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(workdir) -> Path:
    """A 30-step run of tiny.yaml; returns its run folder."""
    trainer = main(tiny_args(workdir, "--run_name", "straight"))
    assert trainer.global_step == 30
    return workdir / "runs" / "straight"


def test_tiny_trains_and_loss_falls(tiny_run):
    loss = read_metric(tiny_run, "train/loss")
    assert sorted(loss) == list(range(30)), "one train/loss per step"
    first, last = [loss[s] for s in range(3)], [loss[s] for s in range(27, 30)]
    assert abs(sum(first) / 3 - math.log(257)) < 0.3, f"an untrained model starts near ln(257): {first}"
    assert sum(last) / 3 < sum(first) / 3 - 1.5, f"loss did not fall: {first} -> {last}"
    val = read_metric(tiny_run, "val/loss")
    assert sorted(val) == [9, 19, 29], f"validation every 10 steps: {val}"
    assert val[29] < val[9]


def test_run_folder_layout(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    ckpts = tiny_run / "checkpoints"
    assert (ckpts / "last.ckpt").is_file()
    assert len(list(ckpts.glob("best-*.ckpt"))) == 1
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 30
    assert ckpt["hyper_parameters"]["n_layer"] == 2 and ckpt["hyper_parameters"]["vocab_size"] == 257
    from minigpt.tokenizer import tokenizer_from_dict

    assert tokenizer_from_dict(ckpt["tokenizer"]).decode([82, 111, 109, 101, 111]) == "Romeo"


def test_csv_holds_the_logged_metrics(tiny_run):
    with open(tiny_run / "metrics.csv", newline="") as f:
        keys = set(csv.DictReader(f).fieldnames)
    expected = {"train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"}
    assert expected <= keys, f"missing: {expected - keys}"
    assert "perf/mfu" not in keys, "no MFU on a CPU (no known peak)"
    lr = read_metric(tiny_run, "train/lr")
    assert lr[0] == pytest.approx(3e-3 * 1 / 6) and lr[4] == pytest.approx(3e-3 * 5 / 6)  # warmup
    assert lr[29] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 24 / 25)) * 2.7e-3)  # cosine
    tokens_per_s = read_metric(tiny_run, "perf/tokens_per_s")
    assert len(tokens_per_s) >= 25 and all(v > 0 for v in tokens_per_s.values())
    assert all(v > 0 for v in read_metric(tiny_run, "train/grad_norm").values())
    # the wall time since launch comes with every validation, at its step, and only grows
    elapsed, val = read_metric(tiny_run, "time/since_launch_s"), read_metric(tiny_run, "val/loss")
    assert sorted(elapsed) == sorted(val) and len(val) == 3
    times = [elapsed[s] for s in sorted(elapsed)]
    assert 0 < times[0] < times[1] < times[2] < 600
    # where the start-up went: logged once, at the first step, on the same clock (tiny.yaml has no sanity
    # validation)
    keys = ("fit_start_s", "sanity_check_s", "first_step_s")
    startup = {key: read_metric(tiny_run, f"time/{key}") for key in keys}
    assert all(list(metric) == [0] for metric in startup.values()), startup
    fit_start, sanity, first_step = (startup[key][0] for key in keys)
    assert 0 < fit_start < first_step < times[0] and sanity == 0


def test_wandb_offline_run_holds_keys_and_config(tiny_run):
    runs = list((tiny_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"one offline wandb run in the run folder, found {runs}"
    history, config = set(), {}
    for record in wandb_records(next(runs[0].glob("*.wandb"))):
        if record.HasField("history"):
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        if record.HasField("config"):
            config |= {item.key: item.value_json for item in record.config.update}
    expected = {"train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"}
    assert expected <= history, f"missing in wandb history: {expected - history}"
    assert config["attention_backend"] == '"sdpa"'
    assert config["torch_version"] == f'"{torch.__version__}"'
    assert {"triton_version", "device", "n_layer", "learning_rate"} <= config.keys()
    # the whole resolved config: the data module's settings and the trainer's too
    data_and_run = {"batch_size", "source", "tokenizer", "val_batches", "seed_everything", "run_name"}
    assert data_and_run <= config.keys()
    assert json.loads(config["trainer"])["max_steps"] == 30
    assert json.loads(config["batch_size"]) == 8


def test_resume_continues_the_same_trajectory(tiny_run, workdir):
    """10 steps, then a resumed run to 20, give the losses of the straight run step for step (data order,
    dropout masks, optimizer and schedule state all continue). The schedule horizon is the straight run's."""
    args = tiny_args(workdir, "--run_name", "resumed", "--model.lr_decay_steps", "30")
    assert main([*args, "--trainer.max_steps", "10"]).global_step == 10
    assert main([*args, "--trainer.max_steps", "20", "--ckpt_path", "last"]).global_step == 20
    straight = read_metric(tiny_run, "train/loss")
    resumed = read_metric(workdir / "runs" / "resumed", "train/loss")
    assert sorted(resumed) == list(range(20))
    diffs = [abs(resumed[s] - straight[s]) for s in range(20)]
    assert max(diffs) < 1e-5, f"resumed losses differ from the straight run: {diffs}"
    assert read_metric(workdir / "runs" / "resumed", "val/loss")[19] == pytest.approx(
        read_metric(tiny_run, "val/loss")[19], abs=1e-5
    )
    # the resumed leg logs into the same wandb run: two offline folders of one run id
    folders = list((workdir / "runs" / "resumed" / "wandb").glob("offline-run-*"))
    run_ids = {log.stem for folder in folders for log in folder.glob("run-*.wandb")}
    assert len(folders) == 2 and len(run_ids) == 1, (folders, run_ids)


def test_muon_run_resumes_the_same_trajectory(workdir):
    """optimizer muon (Muon with AdamW as one optimizer): a run resumed at step 6 continues the straight
    run's losses, so both optimizers' states travel in the checkpoint."""
    args = tiny_args(workdir, "--model.optimizer", "muon", "--model.lr_decay_steps", "12")
    main([*args, "--run_name", "muon-straight", "--trainer.max_steps", "12"])
    main([*args, "--run_name", "muon-resumed", "--trainer.max_steps", "6"])
    main([*args, "--run_name", "muon-resumed", "--trainer.max_steps", "12", "--ckpt_path", "last"])
    straight = read_metric(workdir / "runs" / "muon-straight", "train/loss")
    resumed = read_metric(workdir / "runs" / "muon-resumed", "train/loss")
    assert sorted(resumed) == sorted(straight) == list(range(12))
    assert straight[11] < straight[0]
    assert max(abs(resumed[s] - straight[s]) for s in range(12)) < 1e-5


def test_resume_keeps_the_schedule_of_the_run(workdir):
    """A run resumed with a larger max_steps keeps decaying to the first leg's horizon (no jump of the
    learning rate back up the cosine); lr_decay_steps would set another."""
    args = tiny_args(workdir, "--run_name", "extended", "--trainer.val_check_interval", "5")
    main([*args, "--trainer.max_steps", "10"])
    main([*args, "--trainer.max_steps", "15", "--ckpt_path", "last"])
    lr = read_metric(workdir / "runs" / "extended", "train/lr")
    assert sorted(lr) == list(range(15))
    assert lr[8] == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 3 / 5)) * 2.7e-3)  # horizon 10
    assert all(lr[s] == pytest.approx(3e-4) for s in range(10, 15)), "min_lr after the first leg's horizon"


def test_last_checkpoint_at_the_end_and_after_the_run_folder_moves(workdir, tmp_path):
    """last.ckpt also holds the steps after the last validation; a run folder moved elsewhere resumes into
    the same two files (last.ckpt and one best-step=N.ckpt), so a second resume continues the newest."""
    first = tmp_path / "first"
    main(tiny_args(workdir, "--trainer.default_root_dir", str(first), "--run_name", "r",
                   "--trainer.max_steps", "15"))  # fmt: skip
    checkpoints = first / "r" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 15
    moved = tmp_path / "moved"
    shutil.move(first, moved)
    main(tiny_args(workdir, "--trainer.default_root_dir", str(moved), "--run_name", "r",
                   "--trainer.max_steps", "30", "--ckpt_path", "last"))  # fmt: skip
    checkpoints = moved / "r" / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    assert names == ["best-step=30.ckpt", "last.ckpt"], names
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 30


def test_a_killed_run_resumes_from_its_last_validation(workdir, monkeypatch):
    """last.ckpt is written at every validation, also when val/loss did not improve (Lightning 2.6 writes it
    only next to a new best), so a run killed at step 25 resumes from step 20, not from its best, step 10."""
    from minigpt.module import GPTModule

    training_step = GPTModule.training_step

    def validation_step(self, batch, batch_idx):  # val/loss rises: the first validation stays the best
        self.log("val/loss", float(self.global_step), on_step=False, on_epoch=True)

    def killed_at_25(self, batch, batch_idx):
        if self.global_step == 25:
            raise RuntimeError("killed")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(GPTModule, "validation_step", validation_step)
    monkeypatch.setattr(GPTModule, "training_step", killed_at_25)
    with pytest.raises(RuntimeError, match="killed"):
        main(tiny_args(workdir, "--run_name", "killed", "--wandb_mode", "disabled"))
    checkpoints = workdir / "runs" / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best-step=10.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 20


def test_checkpoint_state_keeps_lightnings_key():
    """RunCheckpoint's state sits in a checkpoint under ModelCheckpoint's key: checkpoints of either restore
    their best-checkpoint bookkeeping into the other."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from minigpt.cli import RunCheckpoint

    plain = ModelCheckpoint(dirpath="c", filename="best-{step}", monitor="val/loss", mode="min", save_top_k=1,
                            save_last=True)  # fmt: skip
    assert RunCheckpoint("c").state_key == plain.state_key


def test_a_replaced_run_gets_a_new_wandb_run(workdir):
    runs = workdir / "runs"
    for name in ("w1", "w2"):
        main(tiny_args(workdir, "--run_name", name, "--trainer.max_steps", "3"))
    main(tiny_args(workdir, "--run_name", "w1", "--trainer.max_steps", "6", "--overwrite", "true",
                   "--ckpt_path", str(runs / "w2" / "checkpoints" / "last.ckpt")))  # fmt: skip
    ids = {log.stem for log in (runs / "w1" / "wandb").glob("offline-run-*/run-*.wandb")}
    assert len(ids) == 2, f"the replacing run logs into a wandb run of its own: {ids}"


def test_accumulated_step_logs_the_mean_of_its_micro_batches(workdir, monkeypatch):
    from minigpt.module import GPTModule

    losses, training_step = [], GPTModule.training_step

    def recording_training_step(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        losses.append(loss.item())
        return loss

    monkeypatch.setattr(GPTModule, "training_step", recording_training_step)
    main(tiny_args(workdir, "--run_name", "accumulated", "--trainer.max_steps", "3",
                   "--trainer.accumulate_grad_batches", "2", "--trainer.enable_checkpointing",
                   "false"))  # fmt: skip
    logged = read_metric(workdir / "runs" / "accumulated", "train/loss")
    assert len(losses) == 6 and losses[0] != losses[1]
    means = [(losses[2 * s] + losses[2 * s + 1]) / 2 for s in range(3)]
    assert [logged[s] for s in range(3)] == pytest.approx(means)


def test_step_logging_off(workdir):
    """log_every_n_steps 0 turns step logging off (Lightning's meaning): no train/loss, no timed step."""
    main(tiny_args(workdir, "--run_name", "quiet", "--trainer.max_steps", "3",
                   "--trainer.log_every_n_steps", "0",
                   "--trainer.enable_checkpointing", "false"))  # fmt: skip
    metrics = workdir / "runs" / "quiet" / "metrics.csv"  # no file when nothing was logged
    rows = list(csv.DictReader(metrics.read_text().splitlines())) if metrics.exists() else []
    assert not any(r.get("train/loss") or r.get("attn/fwd_ms") or r.get("perf/tokens_per_s") for r in rows)


def one_line_error(capsys) -> str:
    """The error a refused command printed: one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("train.py: error: ")]
    assert len(errors) == 1, err
    return errors[0]


def test_derived_keys_cannot_be_set(workdir, tmp_path, capsys):
    """model.block_size sets data.block_size and the tokenizer sets model.vocab_size: a value given for
    either would be dropped, so it is refused, in a config file as on the command line."""
    config = tmp_path / "derived.yaml"
    config.write_text("data:\n  block_size: 16\n")
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--config", str(config)))
    assert e.value.code == 2
    assert "data.block_size cannot be set: model.block_size sets it" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--model.vocab_size=100"))
    assert "model.vocab_size cannot be set" in one_line_error(capsys)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.learning_rate", "0", "learning_rate=0.0: must be > 0"),
        ("--model.min_lr", "0.01", "min_lr=0.01: must lie in"),
        ("--model.lr_decay_steps", "3", "lr_decay_steps=3: must be None or > warmup_steps=5"),
        ("--model.n_embd", "65", "n_embd=65: must be divisible by n_head=2"),
        ("--model.attention", "flash", 'Parser key "model.attention"'),
        ("--data.tokenizer", "bpe-3", "tokenizer='bpe-3' is not known; allowed: byte | gpt2 | bpe-N"),
        ("--data.source", "no/such/file.txt", "the path does not exist; allowed: 'shakespeare'"),
        ("--trainer.max_steps", "-1", "trainer.max_steps=-1: the learning-rate schedule needs an end"),
    ],
)
def test_a_bad_value_fails_in_one_line_before_training(workdir, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--run_name", "bad-value", flag, value))
    assert e.value.code == 2
    assert message in one_line_error(capsys)
    assert not (workdir / "runs" / "bad-value").exists(), "a refused run leaves no run folder"


def test_a_value_error_prints_no_traceback(workdir):
    """The command as a user runs it: one line, exit status 2."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *tiny_args(workdir, "--model.n_embd", "65")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == "train.py: error: n_embd=65: must be divisible by n_head=2"


def test_a_non_utf8_source_names_the_file_and_leaves_no_cache(workdir, tmp_path, capsys):
    source = tmp_path / "binary.txt"
    source.write_bytes(b"Romeo: " * 100 + b"\xff\xfe" + b"more")
    cache = tmp_path / "data"
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--data.source", str(source), "--data.cache_dir", str(cache)))
    assert e.value.code == 2
    error = one_line_error(capsys)
    assert f"{source} is not UTF-8 text: byte 700 (0xff)" in error, error
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


def test_unknown_config_key_fails_clearly(workdir, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--model.n_layers", "3"))
    assert e.value.code == 2
    assert "n_layers" in one_line_error(capsys)


def test_missing_checkpoint_fails_clearly(workdir, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--run_name", "never-trained", "--ckpt_path", "last"))
    assert e.value.code == 2
    error = one_line_error(capsys)
    assert "--ckpt_path last: no checkpoint in " in error
    assert str(Path("never-trained", "checkpoints")) in error
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--ckpt_path", str(workdir / "nope.ckpt")))
    assert "nope.ckpt: no such checkpoint file" in one_line_error(capsys)
    not_a_checkpoint = workdir / "corpus.txt"
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--run_name", "from-text", "--ckpt_path", str(not_a_checkpoint)))
    assert "corpus.txt: not a readable checkpoint" in one_line_error(capsys)


def test_a_new_run_never_replaces_an_old_one_unasked(tiny_run, workdir, capsys):
    with pytest.raises(SystemExit) as e:
        main(tiny_args(workdir, "--run_name", "straight"))
    assert e.value.code == 2
    err = one_line_error(capsys)
    assert "already holds a run" in err and "--ckpt_path last" in err and "--overwrite true" in err
    assert (tiny_run / "checkpoints" / "last.ckpt").is_file(), "the old run's checkpoints are kept"


def test_another_runs_checkpoint_needs_a_run_folder_of_its_own(tiny_run, workdir, capsys):
    other = workdir / "other.ckpt"
    shutil.copy(tiny_run / "checkpoints" / "last.ckpt", other)
    metrics = (tiny_run / "metrics.csv").read_text()
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--run_name", "straight", "--ckpt_path", str(other)))
    assert "already holds a run" in one_line_error(capsys)
    assert (tiny_run / "metrics.csv").read_text() == metrics, "the old run's metrics are kept"


def test_a_checkpoint_that_does_not_fit_fails_clearly(tiny_run, workdir, capsys):
    last = str(tiny_run / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--run_name", "straight", "--ckpt_path", "last", "--data.seed", "7"))
    assert "data.seed=7, but the checkpoint was trained with data.seed=1337" in one_line_error(capsys)
    with pytest.raises(SystemExit):
        main(tiny_args(workdir, "--run_name", "wider", "--ckpt_path", last, "--model.n_embd", "32"))
    assert "its model has n_embd=64, this config model.n_embd=32" in one_line_error(capsys)


def test_print_config_shows_every_section(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", TINY, "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    keys = ("seed_everything:", "trainer:", "max_steps: 30", "model:", "learning_rate:", "time_attention:",
            "n_layer: 2", "attention: auto", "data:", "block_size: 32", "run_name:", "wandb_mode:",
            "ckpt_path:", "default_root_dir: runs")  # fmt: skip
    for key in keys:
        assert key in out, f"{key!r} not in --print_config output"


def test_without_a_config_the_cpu_config_is_the_default(workdir, tmp_path, monkeypatch, capsys):
    """No --config and no CUDA: configs/shakespeare_cpu.yaml, said in the first line printed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        main(["--print_config"])
    out = capsys.readouterr().out
    assert "n_layer: 4" in out and "n_embd: 128" in out and "max_steps: 2000" in out, out
    main(["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.val_batches", "1",
          "--data.source", str(workdir / "corpus.txt"), "--data.cache_dir", str(workdir / "data"),
          "--trainer.default_root_dir", str(tmp_path / "runs"), "--wandb_mode", "disabled",
          "--trainer.enable_progress_bar", "false"])  # fmt: skip
    from minigpt.cli import shown

    first = capsys.readouterr().out.splitlines()[0]
    run = tmp_path / "runs" / "shakespeare_cpu-sdpa"
    config = shown(ROOT / "configs" / "shakespeare_cpu.yaml")  # relative to the working folder, if below it
    assert first == f"train.py: {config} (the default without CUDA), attention sdpa, run folder {run}"
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_a_gpu_sized_config_on_a_cpu_warns_once(workdir, tmp_path, monkeypatch, capsys):
    import minigpt.cli

    monkeypatch.setattr(minigpt.cli, "seconds_per_step_on_cpu", lambda model, tokens: 3.0 * 3600)
    main(tiny_args(workdir, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "2",
                   "--wandb_mode", "disabled"))  # fmt: skip
    warnings = [line for line in capsys.readouterr().err.splitlines() if "sized for a GPU" in line]
    assert len(warnings) == 1, warnings
    assert "its 2 steps would take about 6.0 h on this CPU" in warnings[0]
    assert "python train.py --config configs/shakespeare_cpu.yaml" in warnings[0] or str(
        ROOT / "configs" / "shakespeare_cpu.yaml"
    ) in warnings[0]


def test_default_root_dir_holds_the_run(workdir, tmp_path, monkeypatch, capsys):
    """--trainer.default_root_dir is the folder of the run folders: checkpoints, metrics, wandb and the
    config all go there, nothing into the working folder; the end names the sample command, which runs."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"
    main(tiny_args(workdir, "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3",
                   "--run_name", "r"))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]
    run = root / "r"
    assert {"config.yaml", "metrics.csv", "checkpoints", "wandb"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("run folder elsewhere/r")
    sample_command = "python -m minigpt.sample --ckpt elsewhere/r/checkpoints/last.ckpt"
    assert out[-1] == f"sample from this run: {sample_command}"
    from minigpt.sample import main as sample

    command = shlex.split(out[-1].removeprefix("sample from this run: "))
    (text,) = sample([*command[3:], "--max_new_tokens", "5", "--no_progress"])
    assert len(text) >= 6


def test_validate_reports_the_val_loss_of_a_checkpoint(tiny_run, workdir, capsys):
    """`validate` takes the model and data settings from the checkpoint: the val loss is the one the run
    logged at that step."""
    last = tiny_run / "checkpoints" / "last.ckpt"
    main(["validate", "--ckpt_path", str(last)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"train.py validate: {last} (step 30), attention sdpa")
    report = lines[-1]
    loss = read_metric(tiny_run, "val/loss")[29]
    assert report.startswith(f"val/loss {loss:.4f}, perplexity {math.exp(loss):.2f} ("), report
    assert "step 30; 4 batches of 8 x 32 tokens" in report
    with pytest.raises(SystemExit) as e:
        main(["validate"])
    assert e.value.code == 2 and "validate needs --ckpt_path" in one_line_error(capsys)


def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(workdir, monkeypatch):
    """Killed while writing its first checkpoint, a run leaves metrics and a partial checkpoint file but no
    checkpoint: the same command starts it over, and it finishes."""
    from minigpt.cli import AtomicCheckpointIO

    class Killed(Exception):
        pass

    save = AtomicCheckpointIO.save_checkpoint

    def killed_mid_write(self, checkpoint, path, storage_options=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{path}.tmp").write_bytes(b"PK\x03\x04 cut short")
        raise Killed

    args = tiny_args(workdir, "--run_name", "killed-early", "--trainer.max_steps", "12",
                     "--wandb_mode", "disabled")  # fmt: skip
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", killed_mid_write)
    with pytest.raises(Killed):
        main(args)
    run = workdir / "runs" / "killed-early"
    assert (run / "metrics.csv").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step=10.ckpt.tmp"]
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    assert main(args).global_step == 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step=10.ckpt", "last.ckpt"]
    assert sorted(read_metric(run, "train/loss")) == list(range(12)), "the metrics of the one run"


def test_ckpt_path_last_takes_the_best_checkpoint_when_it_is_newest(tiny_run, workdir):
    """Killed after best-step=20.ckpt was written but before last.ckpt: --ckpt_path last resumes from the
    best checkpoint, and the run continues the straight run's trajectory."""
    args = tiny_args(workdir, "--run_name", "best-newest", "--model.lr_decay_steps", "30",
                     "--wandb_mode", "disabled")  # fmt: skip
    main([*args, "--trainer.max_steps", "20"])
    checkpoints = workdir / "runs" / "best-newest" / "checkpoints"
    straight_val = read_metric(tiny_run, "val/loss")
    assert straight_val[19] < straight_val[9], "the validation at step 20 is the best so far"
    (checkpoints / "last.ckpt").unlink()
    assert main([*args, "--trainer.max_steps", "30", "--ckpt_path", "last"]).global_step == 30
    resumed, straight = read_metric(checkpoints.parent, "train/loss"), read_metric(tiny_run, "train/loss")
    assert sorted(resumed) == list(range(30))
    assert max(abs(resumed[s] - straight[s]) for s in range(30)) < 1e-5


def test_no_files_are_left_in_the_temp_folder(workdir, tmp_path):
    """A whole run (checkpoints, CSV and offline wandb logs) as a user runs it, with its own temp folder."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1"}
    args = tiny_args(workdir, "--trainer.default_root_dir", str(tmp_path / "runs"),
                     "--trainer.max_steps", "12")  # fmt: skip
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, env=env, timeout=600,
                   capture_output=True)  # fmt: skip
    assert (tmp_path / "runs" / "tiny-sdpa" / "checkpoints" / "last.ckpt").is_file()
    left = [p for p in temp.rglob("*") if not p.is_dir()]
    assert left == [], left


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_and_sdpa_train_alike(tmp_path):
    """200 steps of shakespeare_char without dropout, once per backend: same data, same initialization,
    the same math up to bf16 rounding, so the loss curves agree within bf16 noise."""
    losses = {}
    for backend in ("triton", "sdpa"):
        main([
            "--config", str(ROOT / "configs" / "shakespeare_char.yaml"),
            "--model.attention", backend, "--model.dropout", "0",
            "--trainer.max_steps", "200", "--trainer.val_check_interval", "100", "--data.val_batches", "20",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--data.cache_dir", str(tmp_path / "data"), "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--wandb_mode", "disabled",
        ])  # fmt: skip
        losses[backend] = read_metric(tmp_path / "runs" / f"shakespeare_char-{backend}", "train/loss")
    triton, sdpa = losses["triton"], losses["sdpa"]
    assert sorted(triton) == sorted(sdpa) == list(range(200))
    diffs = [abs(triton[s] - sdpa[s]) for s in range(200)]
    print(f"max |triton - sdpa| train/loss: {max(diffs):.4f}, final {triton[199]:.4f} vs {sdpa[199]:.4f}")
    assert triton[199] < triton[0] - 2.0, "training made progress"
    assert max(diffs[:20]) < 0.02, "the first steps agree closely"
    assert max(diffs) < 0.1
    tail = sum(triton[s] - sdpa[s] for s in range(180, 200)) / 20
    assert abs(tail) < 0.03, f"the last 20 steps differ by {tail:.4f} on average"


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_cuda_graphs_train_like_eager(tmp_path, attention):
    """compile_mode reduce-overhead replays forward and backward as CUDA graphs, whose outputs (loss,
    gradients) live in memory the next replay reuses: with two micro-batches per step, a wrong step
    boundary would add the second micro-batch's gradient to itself. Same steps as eager, within bf16."""
    common = [
        "--model.attention", attention, "--model.dropout", "0", "--trainer.max_steps", "20",
        "--trainer.accumulate_grad_batches", "2", "--model.time_attention", "false",
    ]  # fmt: skip
    graphs = ["--model.compile", "true", "--model.compile_mode", "reduce-overhead"]
    loss, grad = {}, {}
    for name, extra in (("eager", []), ("graphs", graphs)):
        main(tiny_args(tmp_path, "--run_name", name, "--data.source", "shakespeare", *common, *extra))
        loss[name] = read_metric(tmp_path / "runs" / name, "train/loss")
        grad[name] = read_metric(tmp_path / "runs" / name, "train/grad_norm")
    assert sorted(loss["eager"]) == sorted(loss["graphs"]) == list(range(20))
    diffs = [abs(loss["eager"][s] - loss["graphs"][s]) for s in range(20)]
    print(f"{attention}: max |eager - graphs| loss {max(diffs):.4f}")
    assert max(diffs) < 0.05
    grad_ratio = [grad["graphs"][s] / grad["eager"][s] for s in range(20)]
    assert all(0.9 < r < 1.1 for r in grad_ratio), grad_ratio


def straight_and_resumed(workdir: Path, tmp_path: Path, *launch: str, env: dict | None = None):
    """Train tiny.yaml 10 steps straight, and 6 steps then resumed to 10, each time with the launch arguments
    (devices, strategy); returns the two run folders."""

    def train(name: str, *extra: str) -> Path:
        args = tiny_args(workdir, "--trainer.default_root_dir", str(tmp_path), "--run_name", name,
                         "--wandb_mode", "disabled")  # fmt: skip
        args += [*launch, "--trainer.val_check_interval", "3", "--model.lr_decay_steps", "10", *extra]
        subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, env=env, timeout=600,
                       capture_output=True)  # fmt: skip
        return tmp_path / name

    straight = train("straight", "--trainer.max_steps", "10")
    train("resumed", "--trainer.max_steps", "6")
    return straight, train("resumed", "--trainer.max_steps", "10", "--ckpt_path", "last")


def test_ddp_two_processes_train_and_resume(workdir, tmp_path):
    """Lightning DDP with 2 processes (CPU, gloo): metrics come once per step from rank zero, validation is
    reduced over the ranks, and a run resumed under DDP continues the straight run's trajectory."""
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    a, b = read_metric(straight, "train/loss"), read_metric(resumed, "train/loss")
    assert sorted(a) == sorted(b) == list(range(10))
    assert all(a[s] == pytest.approx(b[s], abs=1e-6) for s in range(10)), (a, b)
    assert a[9] < a[0]
    with open(straight / "metrics.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert steps == list(range(10)), "one row per step: rank zero alone writes"
    assert len(read_metric(straight, "val/loss")) == 3


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fsdp_two_gpus_train_and_resume(workdir, tmp_path):
    """Lightning FSDP on two GPUs with the triton backend: trains, and a run resumed from its sharded
    training's checkpoint continues the straight run's trajectory."""
    straight, resumed = straight_and_resumed(
        workdir, tmp_path, "--trainer.accelerator", "gpu", "--trainer.devices", "2",
        "--trainer.strategy", "fsdp", "--model.attention", "triton",
    )  # fmt: skip
    a, b = read_metric(straight, "train/loss"), read_metric(resumed, "train/loss")
    assert sorted(a) == sorted(b) == list(range(10))
    assert all(a[s] == pytest.approx(b[s], rel=1e-3) for s in range(10)), (a, b)
    assert a[9] < a[0]
    assert len(read_metric(straight, "val/loss")) == 3


def test_fsdp_gradient_norm_counts_each_shard_once():
    from minigpt.module import shard_copies

    assert shard_copies("FULL_SHARD", 8, 2) == 1 and shard_copies("SHARD_GRAD_OP", 8, 2) == 1
    assert shard_copies("NO_SHARD", 8, 2) == 8  # every rank holds the whole gradient
    assert shard_copies("HYBRID_SHARD", 8, 2) == 2  # sharded within a node, one copy per node
    with pytest.raises(ValueError, match="not supported"):
        shard_copies("SOMETHING_NEW", 8, 2)
