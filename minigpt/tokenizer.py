"""Tokenizers: every one is a `tiktoken.Encoding`, so encoding is fast and decoding is exact.

Names (the `--data.tokenizer` values):

- `byte`   256 byte tokens plus `<|endoftext|>` (id 256). Needs no data and no network; the default.
- `gpt2`   OpenAI's GPT-2 BPE (50257 tokens), read through tiktoken's `r50k_base`: the same ranks,
           pattern and `<|endoftext|>` as its `gpt2`, in one hash-checked file. Downloaded once; offline,
           `python -m minigpt.tokenizer install-gpt2 FILE` puts a copy of that file (e.g. the one the
           openai-whisper package ships as `whisper/assets/gpt2.tiktoken`) into tiktoken's cache.
- `bpe-N`  a byte-level BPE of N tokens (N >= 257: N - 1 learned tokens plus `<|endoftext|>`), trained
           with `rustbpe` on the training split and saved beside the data cache.

A checkpoint stores `tokenizer_to_dict(enc)`, plain Python data, so it can sample without the data
folder or the network: `tokenizer_from_dict` rebuilds the same encoding.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import tiktoken

EOT = "<|endoftext|>"
TOKENIZERS = "byte | gpt2 | bpe-N (N an int >= 257, e.g. bpe-4096)"
_BPE_NAME = re.compile(r"bpe-(\d+)")
# Byte tokens never merge, so any split works; whitespace runs vs. the rest keeps pieces short.
_BYTE_PATTERN = r"\s+|\S+"
# GPT-2's ranks as tiktoken fetches them for `r50k_base`, and the SHA-256 it checks them against.
GPT2_RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def _bpe_size(name: str) -> int | None:
    """N for a name `bpe-N`, None for any other name."""
    m = _BPE_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def vocab_size_for(name: str) -> int:
    """Vocabulary size of the tokenizer `name`, known without any data."""
    if name == "byte":
        return 257
    if name == "gpt2":
        return 50257
    n = _bpe_size(name) if isinstance(name, str) else None
    if n is not None and n >= 257:
        return n
    raise ValueError(f"tokenizer={name!r} is not known; allowed: {TOKENIZERS}")


def byte_tokenizer() -> tiktoken.Encoding:
    """256 byte tokens (token i is the byte i) and `<|endoftext|>` = 256."""
    return tiktoken.Encoding(
        name="byte",
        pat_str=_BYTE_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={EOT: 256},
    )


def _gpt2() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding("r50k_base")
    except Exception as e:  # tiktoken raises whatever its HTTP client raises when offline
        raise ValueError(
            "tokenizer='gpt2' could not be loaded: tiktoken downloads its file once and then reads it "
            "from TIKTOKEN_CACHE_DIR. Connect to the network once, or install a copy of the file offline "
            "with `python -m minigpt.tokenizer install-gpt2 FILE` (or use tokenizer='byte' or 'bpe-N'). "
            f"Cause: {e!r}"
        ) from e


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken keeps downloaded files in, by tiktoken's own rule (TIKTOKEN_CACHE_DIR, else
    DATA_GYM_CACHE_DIR, else a temp folder); None when the variable is set empty, which turns caching off."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def install_gpt2_ranks(path: Path | str, cache_dir: Path | str | None = None) -> Path:
    """Copy GPT-2's rank file `path` into tiktoken's cache, where `tokenizer='gpt2'` finds it offline.

    The file is checked against the SHA-256 tiktoken expects; tiktoken names cached files by the SHA-1
    of their URL. Written to a temporary name first, so a reader never sees half a file."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_RANKS_SHA256:
        raise ValueError(
            f"{path} is not GPT-2's rank file: its SHA-256 is {digest}, expected {GPT2_RANKS_SHA256} "
            "(the file tiktoken calls r50k_base.tiktoken)"
        )
    folder = Path(cache_dir) if cache_dir is not None else tiktoken_cache_dir()
    if folder is None:
        raise ValueError("TIKTOKEN_CACHE_DIR is set empty, which turns tiktoken's cache off; pass a folder")
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / hashlib.sha1(GPT2_RANKS_URL.encode()).hexdigest()
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None) -> tiktoken.Encoding:
    """Train a BPE of `vocab_size` tokens (the last one `<|endoftext|>`) on `texts` with rustbpe."""
    import rustbpe  # imported here: only bpe-N needs it

    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small for a BPE; allowed: >= 257")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size=vocab_size - 1)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    if len(ranks) != vocab_size - 1:
        raise ValueError(
            f"tokenizer='bpe-{vocab_size}': the training text only yields {len(ranks) + 1} distinct tokens; "
            f"choose a smaller N (at most bpe-{len(ranks) + 1}) or a larger corpus"
        )
    return tiktoken.Encoding(
        name=name or f"bpe-{vocab_size}",
        pat_str=trainer.get_pattern(),
        mergeable_ranks=ranks,
        special_tokens={EOT: vocab_size - 1},
    )


def tokenizer_to_dict(enc: tiktoken.Encoding) -> dict:
    """Plain-Python (JSON and pickle safe) description of `enc`, enough to rebuild it exactly."""
    # tiktoken has no public accessor for the pattern and ranks; these attributes are stable across versions.
    ranks = enc._mergeable_ranks
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [rank for _, rank in by_rank] != list(range(len(by_rank))):
        raise ValueError(f"tokenizer {enc.name!r}: ranks are not 0..{len(by_rank) - 1}, cannot store it")
    return {
        "name": enc.name,
        "pat_str": enc._pat_str,
        # base64 as in tiktoken's own files; the list position is the token id
        "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
        "special_tokens": dict(enc._special_tokens),
    }


def tokenizer_from_dict(d: dict) -> tiktoken.Encoding:
    """Inverse of `tokenizer_to_dict`."""
    if not isinstance(d, dict) or not {"name", "pat_str", "mergeable_ranks", "special_tokens"} <= d.keys():
        raise TypeError(
            "tokenizer_from_dict expects the dict made by tokenizer_to_dict "
            "(keys name, pat_str, mergeable_ranks, special_tokens)"
        )
    return tiktoken.Encoding(
        name=d["name"],
        pat_str=d["pat_str"],
        mergeable_ranks={base64.b64decode(t): i for i, t in enumerate(d["mergeable_ranks"])},
        special_tokens={str(k): int(v) for k, v in d["special_tokens"].items()},
    )


def load_tokenizer(
    name: str, train_texts: Iterable[str] | None = None, cache_dir: Path | str | None = None
) -> tiktoken.Encoding:
    """The tokenizer `name`. For `bpe-N`: load `cache_dir/bpe-N.json` if present, else train it on
    `train_texts`, save it there and load it back (so a fresh run and a cached run see the same file)."""
    vocab_size = vocab_size_for(name)  # validates the name first
    if name == "byte":
        return byte_tokenizer()
    if name == "gpt2":
        return _gpt2()
    path = Path(cache_dir) / f"{name}.json" if cache_dir is not None else None
    if path is not None and path.exists():
        return tokenizer_from_dict(json.loads(path.read_text()))
    if train_texts is None:
        raise ValueError(f"tokenizer={name!r} must be trained: pass train_texts (none saved in {cache_dir})")
    enc = train_bpe(train_texts, vocab_size, name=name)
    if path is None:
        return enc
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(tokenizer_to_dict(enc)))
    tmp.replace(path)
    return tokenizer_from_dict(json.loads(path.read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minigpt.tokenizer", description="Tokenizer files.")
    commands = parser.add_subparsers(dest="command", required=True)
    install = commands.add_parser(
        "install-gpt2", help="copy GPT-2's rank file into tiktoken's cache (offline use)"
    )
    install.add_argument("file", help="r50k_base.tiktoken, or the same file under another name")
    install.add_argument(
        "--cache_dir", default=None, help="default: TIKTOKEN_CACHE_DIR, else tiktoken's temp folder"
    )
    args = parser.parse_args(argv)
    target = install_gpt2_ranks(args.file, args.cache_dir)
    print(f"installed {target}")
    if target.parent != tiktoken_cache_dir():
        print(f"tiktoken reads it with TIKTOKEN_CACHE_DIR={target.parent}")


if __name__ == "__main__":
    main()
