"""bench/time_to_loss.py: nanoGPT's character data decodes back to the text; one measurement end to end with
a fake nanoGPT checkout and a tiny run of ours; bad input is refused as one line (exit 2)."""

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("time_to_loss", ROOT / "bench" / "time_to_loss.py")
time_to_loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(time_to_loss)

# what the fake checks of its folder and its process: the data in place and no .git (not copied), empty
# compile caches of its own, wandb offline
CHECKS = """\
import os
assert {"train.bin", "val.bin", "meta.pkl"} <= set(os.listdir("data/shakespeare_char"))
assert not os.path.exists(".git")
caches = [os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]]
assert not any(os.listdir(folder) for folder in caches) and os.environ["WANDB_MODE"] == "offline"
print("caches:", *caches)
"""
FAKE_NANOGPT = """\
import time
for step, train, val in [(0, 4.5, 4.4), (125, 2.0, 1.9), (250, 1.3, 1.30)]:
    print(f"step {step}: train loss {train:.4f}, val loss {val:.4f}")
    print(f"iter {step}: loss {train:.4f}, time 10.00ms, mfu 1.00%")
    time.sleep(0.1)
"""


def fake_nanogpt(folder: Path) -> Path:
    """A checkout that prints nanoGPT's evaluation lines (and iteration lines between them)."""
    (folder / "config").mkdir(parents=True)
    (folder / "config" / "train_shakespeare_char.py").write_text("")
    (folder / "train.py").write_text(CHECKS + FAKE_NANOGPT)
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/master\n")
    return folder


def test_nanogpt_data_decodes_to_the_text(tmp_path):
    text = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak. Ünïcödé €\n" * 7
    )
    meta = time_to_loss.write_nanogpt_char_data(text, tmp_path)
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "val.bin", dtype=np.uint16)
    with open(tmp_path / "meta.pkl", "rb") as f:
        assert pickle.load(f) == meta
    chars = sorted(set(text))
    assert meta["vocab_size"] == len(chars) and meta["itos"] == dict(enumerate(chars))
    assert all(meta["itos"][meta["stoi"][c]] == c for c in chars)
    split = int(0.9 * len(text))
    assert len(train) == split and len(val) == len(text) - split
    assert (tmp_path / "train.bin").stat().st_size == 2 * split  # uint16 on disk
    decode = lambda ids: "".join(meta["itos"][int(i)] for i in ids)  # noqa: E731
    assert decode(train) == text[:split] and decode(val) == text[split:]


def test_one_measurement_end_to_end(tmp_path, capsys):
    from minigpt.data import shakespeare_text

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(shakespeare_text()[:300_000])
    out = tmp_path / "ttl"
    tiny = ["--config", "configs/tiny.yaml", "--trainer.max_steps", "20",
            "--trainer.val_check_interval", "10", "--data.cache_dir", str(tmp_path / "data"),
            "--wandb_mode", "disabled"]  # fmt: skip
    checkout = fake_nanogpt(tmp_path / "nG")
    time_to_loss.main(["--out", str(out), "--source", str(corpus), "--nanogpt", str(checkout),
                       "--runs", "sdpa", "--target", "1.35", "--", *tiny])  # fmt: skip

    log = (out / "nanogpt.log").read_text().splitlines()
    assert log[0].startswith("nanoGPT data: 300,000 characters")
    output = [line for line in log if not line.startswith(("nanoGPT data:", "$ "))]
    assert len(output) == 7 and all(line[:7].strip().replace(".", "").isdigit() for line in output), log
    caches = output[0].split("caches: ")[1].split()
    assert len(caches) == 2 and not any(Path(folder).exists() for folder in caches)  # removed afterwards
    curve = time_to_loss.plot_time_to_loss.read_curve(out / "nanogpt.log")
    assert [v for _, v in curve] == [4.4, 1.9, 1.3] and curve[0][0] < curve[-1][0]

    summary = (out / "summary.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2, summary
    nanogpt, ours = (row.split(" | ") for row in rows)
    assert nanogpt[0] == "| nanoGPT train.py" and nanogpt[2].startswith("step 250 (1.3000)")
    assert nanogpt[3] == "1.3000" and nanogpt[5] == ""
    assert ours[0] == "| minigpt sdpa #1" and ours[1].endswith("(step 9)")
    assert ours[2].startswith("not reached (best ")  # 20 tiny steps stay far above 1.35
    assert 1 < float(ours[3]) < 6 and float(ours[5].replace(",", "")) > 0 and ours[6].endswith(" s |")
    assert ", torch " in summary and ", triton " in summary and "failed" not in summary
    assert capsys.readouterr().out.count("| minigpt sdpa #1") == 1  # the summary is printed too
    assert (out / "time_to_loss.png").read_bytes().startswith(b"\x89PNG")
    assert not (out / "shakespeare.txt").exists()  # --source: the file itself is the text


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "not-nanogpt"
    empty.mkdir()
    for argv, expected in [
        (["--nanogpt", str(empty)], f"--nanogpt {empty}: not a nanoGPT checkout (no train.py and no config/"),
        (["--runs", "triton,flash"], "--runs 'triton,flash': unknown backend flash; allowed: "),
    ]:
        with pytest.raises(SystemExit) as e:
            time_to_loss.main(["--out", str(tmp_path / "out"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and expected in err[-1], err
        assert len([line for line in err if not line.startswith(("usage:", "   "))]) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_failed_run_is_reported_with_the_end_of_its_log(tmp_path):
    checkout = fake_nanogpt(tmp_path / "nG")
    (checkout / "train.py").write_text(
        'print("step 0: train loss 4.5, val loss 4.4")\nraise SystemExit("out of memory")\n'
    )
    out = tmp_path / "ttl"
    time_to_loss.main(["--out", str(out), "--text", "pystdlib", "--nanogpt", str(checkout), "--runs", ""])
    summary = (out / "summary.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| nanoGPT"))
    assert row.startswith("| nanoGPT train.py (failed, exit 1) | ")
    assert "not reached (best 4.4000 at step 0)" in row
    assert "nanoGPT train.py failed with exit status 1" in summary and "out of memory" in summary
    assert (out / "pystdlib.txt").stat().st_size > 1_000_000 and (out / "time_to_loss.png").is_file()
