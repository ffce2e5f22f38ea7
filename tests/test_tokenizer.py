"""Tokenizers: names, sizes, exact round trips, a small BPE trained in a temp folder, checkpoint state."""

import hashlib
import json
import random

import pytest
import tiktoken

from minigpt.tokenizer import (
    EOT,
    GPT2_RANKS_SHA256,
    GPT2_RANKS_URL,
    byte_tokenizer,
    install_gpt2_ranks,
    load_tokenizer,
    tokenizer_from_dict,
    tokenizer_to_dict,
    vocab_size_for,
)

SAMPLES = [
    "",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "  leading and trailing spaces  \n\n\n",
    "tabs\tand\r\nwindows line ends, digits 0123456789, punctuation !?;:'\"()[]{}",
    "unicode: naïve café — 東京 🙂 Ωμέγα",
]


def random_text(rng: random.Random, n_chars: int) -> str:
    """Word-like text with a skewed vocabulary, so a BPE has pairs worth merging."""
    syllables = ["th", "e", "an", "ing", "or", "qu", "ee", "st", "ro", "ma", "ll", "ou", "é", "ß"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(300)]
    out, n = [], 0
    while n < n_chars:
        line = " ".join(rng.choices(words, weights=range(len(words), 0, -1), k=rng.randint(3, 12)))
        line = line.capitalize() + rng.choice([".", ",", "!", "?", ";"]) + "\n"
        out.append(line)
        n += len(line)
    return "".join(out)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(1234)
    return random_text(rng, 60_000).splitlines(keepends=True)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> tuple[tiktoken.Encoding, object]:
    folder = tmp_path_factory.mktemp("tok")
    return load_tokenizer("bpe-320", train_texts=corpus, cache_dir=folder), folder


def test_vocab_sizes():
    assert vocab_size_for("byte") == 257
    assert vocab_size_for("gpt2") == 50257
    assert vocab_size_for("bpe-257") == 257
    assert vocab_size_for("bpe-4096") == 4096


@pytest.mark.parametrize(
    "name", ["bpe-256", "bpe-0", "bpe-", "bpe-x", "bpe4096", "gpt-2", "char", "", "BYTE"]
)
def test_unknown_names_raise(name):
    with pytest.raises(ValueError, match="byte \\| gpt2 \\| bpe-N") as e:
        vocab_size_for(name)
    assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match="bpe-N"):
        load_tokenizer(name)


def test_byte_tokenizer_round_trip():
    enc = byte_tokenizer()
    assert enc.n_vocab == 257 and enc.eot_token == 256
    assert enc.encode(EOT, allowed_special="all") == [256]
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(32, 0x2FF)] + ["\n", "\t", " ", "🙂", "東"]
    texts = SAMPLES + ["".join(rng.choices(alphabet, k=rng.randint(1, 300))) for _ in range(50)]
    for text in texts:
        ids = enc.encode_ordinary(text)
        assert ids == list(text.encode("utf-8"))  # token i is byte i
        assert enc.decode(ids) == text


def test_bpe_trains_saves_and_round_trips(bpe, corpus):
    enc, folder = bpe
    assert enc.name == "bpe-320" and enc.n_vocab == 320 and enc.eot_token == 319
    assert (folder / "bpe-320.json").exists()
    text = "".join(corpus[:200])
    ids = enc.encode_ordinary(text)
    assert max(ids) < 319
    assert len(ids) < 0.6 * len(text.encode())  # it learned merges worth having
    for sample in SAMPLES + [text]:
        assert enc.decode(enc.encode_ordinary(sample)) == sample


def test_bpe_reloads_from_cache_without_training(bpe, corpus):
    enc, folder = bpe
    again = load_tokenizer("bpe-320", cache_dir=folder)  # no texts: must come from the saved file
    text = "".join(corpus[-300:])
    assert again.encode_ordinary(text) == enc.encode_ordinary(text)


def test_bpe_needs_texts_or_a_saved_file(tmp_path):
    with pytest.raises(ValueError, match="train_texts"):
        load_tokenizer("bpe-300", cache_dir=tmp_path)


def test_bpe_too_large_for_its_corpus(tmp_path):
    with pytest.raises(ValueError, match="smaller N"):
        load_tokenizer("bpe-5000", train_texts=["abc abd abe"] * 10, cache_dir=tmp_path)


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_checkpoint_state_round_trip(which, bpe, corpus):
    enc = byte_tokenizer() if which == "byte" else bpe[0]
    state = json.loads(json.dumps(tokenizer_to_dict(enc)))  # must survive JSON
    back = tokenizer_from_dict(state)
    assert back.name == enc.name and back.n_vocab == enc.n_vocab and back.eot_token == enc.eot_token
    text = "".join(corpus[:50]) + SAMPLES[-1]
    assert back.encode_ordinary(text) == enc.encode_ordinary(text)


def test_from_dict_rejects_other_things():
    with pytest.raises(TypeError, match="tokenizer_to_dict"):
        tokenizer_from_dict({"name": "byte"})


def test_gpt2_offline_error_names_cache_dir(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR"):
        load_tokenizer("gpt2")


def test_gpt2_round_trip():
    try:
        enc = load_tokenizer("gpt2")
    except ValueError:
        pytest.skip("gpt2 files not cached and no network")
    assert enc.n_vocab == vocab_size_for("gpt2")
    for text in SAMPLES:
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    back = tokenizer_from_dict(tokenizer_to_dict(enc))
    assert back.encode_ordinary(SAMPLES[1]) == enc.encode_ordinary(SAMPLES[1])


def test_install_gpt2_ranks_rejects_another_file(tmp_path):
    wrong = tmp_path / "not_gpt2.tiktoken"
    wrong.write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(ValueError, match="not GPT-2's rank file"):
        install_gpt2_ranks(wrong, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_installed_ranks_are_what_tiktoken_reads_offline(tmp_path, monkeypatch):
    """A (small, fake) rank file installed under tiktoken's name for GPT-2's URL is read back by tiktoken's
    own cache reader, with the network read forbidden."""
    import tiktoken.load

    fake = tmp_path / "ranks.tiktoken"
    fake.write_bytes(b"IQ== 0\nIg== 1\n")
    digest = hashlib.sha256(fake.read_bytes()).hexdigest()
    monkeypatch.setattr("minigpt.tokenizer.GPT2_RANKS_SHA256", digest)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    target = install_gpt2_ranks(fake)
    assert target.parent == tmp_path / "cache" and not list(target.parent.glob("*.tmp"))
    monkeypatch.setattr(tiktoken.load, "read_file", lambda url: pytest.fail(f"network read of {url}"))
    assert tiktoken.load.load_tiktoken_bpe(GPT2_RANKS_URL, expected_hash=digest) == {b"!": 0, b'"': 1}
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's switch for "no cache"
    with pytest.raises(ValueError, match="set empty"):
        install_gpt2_ranks(fake)


def test_gpt2_is_tiktokens_r50k_base_file():
    """The URL and hash we install under are the ones tiktoken's r50k_base (= its gpt2 ranks) loads."""
    import tiktoken_ext.openai_public as openai_public

    seen = {}

    def record(url, expected_hash=None):
        seen.update(url=url, expected_hash=expected_hash)
        return {b"a": 0}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", record)
        spec = openai_public.r50k_base()
    assert seen == {"url": GPT2_RANKS_URL, "expected_hash": GPT2_RANKS_SHA256}
    assert spec["special_tokens"] == {EOT: 50256} and spec["explicit_n_vocab"] == 50257
