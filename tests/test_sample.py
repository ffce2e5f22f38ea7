"""The sampling CLI: a checkpoint alone gives text of exactly the requested length; clear errors."""

from pathlib import Path

import pytest
import torch

from minigpt.cli import main as main_train
from minigpt.sample import SEPARATOR, main
from minigpt.tokenizer import tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """last.ckpt of a 10-step tiny.yaml run on a slice of the built-in corpus."""
    from minigpt.data import shakespeare_text

    root = tmp_path_factory.mktemp("sample")
    (root / "corpus.txt").write_text(shakespeare_text()[:200_000])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    try:
        main_train([
            "--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.max_steps", "10",
            "--data.source", str(root / "corpus.txt"), "--data.cache_dir", str(root / "data"),
            "--trainer.default_root_dir", str(root / "runs"), "--run_name", "tiny",
            "--wandb_mode", "disabled", "--trainer.enable_progress_bar", "false",
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    return root / "runs" / "tiny" / "checkpoints" / "last.ckpt"


def samples(out: str) -> list[str]:
    """The printed samples: each is followed by a newline, separated by a line of dashes."""
    assert out.endswith("\n")
    return out[:-1].split(f"\n{SEPARATOR}\n")


@pytest.mark.parametrize("max_new_tokens", [20, 75])  # 75 > block_size 32: the context slides
def test_prints_the_requested_number_of_new_tokens(checkpoint, capsys, max_new_tokens):
    main(["--ckpt", str(checkpoint), "--prompt", "ROMEO:", "--max_new_tokens", str(max_new_tokens),
          "--num_samples", "2", "--top_k", "40", "--seed", "3"])
    captured = capsys.readouterr()
    texts = samples(captured.out)
    enc = tokenizer_from_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["tokenizer"])
    assert len(texts) == 2
    for text in texts:
        assert text.startswith("ROMEO:")
        assert len(enc.encode(text[len("ROMEO:") :], allowed_special="all")) == max_new_tokens
    assert texts[0] != texts[1], "two samples of one batch differ"
    assert "sampling" in captured.err, "a progress bar on stderr"


def test_seed_makes_samples_reproducible(checkpoint, capsys):
    outs = []
    for seed in ("7", "7", "8"):
        main(["--ckpt", str(checkpoint), "--max_new_tokens", "30", "--no_progress", "--seed", seed])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1], "the same seed gives the same sample"
    assert outs[0] != outs[2], "another seed gives another sample"


def test_missing_checkpoint_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "missing.ckpt")])
    assert e.value.code == 2
    assert "missing.ckpt: no such checkpoint file" in capsys.readouterr().err


def test_prompt_longer_than_block_size_fails_clearly(checkpoint, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(checkpoint), "--prompt", "x" * 33])
    assert e.value.code == 2
    assert "--prompt is 33 tokens, longer than the model's block_size=32" in capsys.readouterr().err


def test_a_triton_checkpoint_samples_on_the_cpu(checkpoint, tmp_path):
    """A run trained with the Triton kernel samples on a machine without a GPU, through SDPA."""
    from minigpt.sample import load_checkpoint

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["attention"] = "triton"
    path = tmp_path / "triton.ckpt"
    torch.save(ckpt, path)
    model, _ = load_checkpoint(path, "cpu")
    assert {block.attn.backend for block in model.transformer.h} == {"sdpa"}


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_gpu_samples_through_the_captured_decoder(checkpoint, capsys, monkeypatch, attention):
    """On CUDA the CLI samples with minigpt.decode.Decoder (static cache, captured step) for either
    backend: the requested length past block_size (a refill), and the same text for the same seed."""
    import minigpt.decode

    decoders = []
    original = minigpt.decode.Decoder.generate

    def recorded(self, *args, **kwargs):
        decoders.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(minigpt.decode.Decoder, "generate", recorded)
    outs = []
    for seed in ("5", "5"):
        texts = main(["--ckpt", str(checkpoint), "--device", "cuda", "--attention", attention,
                      "--prompt", "ROMEO:", "--max_new_tokens", "75", "--num_samples", "2",
                      "--top_k", "40", "--seed", seed, "--no_progress"])
        outs.append(texts)
    assert len(decoders) == 2 and all(d.graph is not None for d in decoders), "captured decode steps"
    enc = tokenizer_from_dict(torch.load(checkpoint, map_location="cpu", weights_only=False)["tokenizer"])
    for text in outs[0]:
        assert len(enc.encode(text[len("ROMEO:") :], allowed_special="all")) == 75
    assert outs[0] == outs[1], "the same seed gives the same samples"
    capsys.readouterr()
