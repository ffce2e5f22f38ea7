"""End-to-end sampling speed: tokens per second of python -m minigpt.sample's path, on random weights.

    python -m minigpt.bench_sample [--models char gpt2_124m] [--batch 1 16] [--attention triton sdpa]
                                   [--new_tokens 1000] [--json FILE]

Models: the shapes of configs/shakespeare_char.yaml (the char GPT: 6 x 6 x 384, block 256, rotary
positions, RMSNorm, ReLU^2, the byte vocabulary) and configs/gpt2_124m.yaml (12 x 12 x 768, block 1024,
the GPT-2 vocabulary), read from the configs, with random weights: speed does not depend on their values.

Method: the model in bf16 on one GPU, a one-token prompt per sequence, sampling as the CLI's defaults do
(temperature 0.8, top-k 200). A Decoder (minigpt.decode) generates new_tokens once as a warm-up (compiling,
capturing the decode step), then again, timed from the first launch to the last token on the GPU.
Past block_size the cache is refilled from the last block_size // 2 tokens, an eager prefill that the
time includes. tokens/s = batch * new_tokens / time.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import yaml

from minigpt.decode import Decoder
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import vocab_size_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = {"char": "shakespeare_char.yaml", "gpt2_124m": "gpt2_124m.yaml"}


def model_config(name: str, attention: str) -> GPTConfig:
    """GPTConfig of a config file's model section, its vocabulary from the tokenizer it names."""
    cfg = yaml.safe_load((CONFIGS / MODELS[name]).read_text())
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    model = {k: v for k, v in (cfg.get("model") or {}).items() if k in fields}
    tokenizer = (cfg.get("data") or {}).get("tokenizer", "byte")
    model.update(vocab_size=vocab_size_for(tokenizer), attention=attention, dropout=0.0)
    return GPTConfig(**model)


def tokens_per_second(model: GPT, batch: int, new_tokens: int, seed: int = 0) -> tuple[float, float]:
    """(tokens/s of the timed run, seconds of the warm-up run) for one model and batch size."""
    generator = torch.Generator("cuda").manual_seed(seed)
    decoder = Decoder(model, temperature=0.8, top_k=200, generator=generator)
    idx = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda", generator=generator)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decoder.generate(idx, new_tokens)  # warm-up: compiles kernels, captures the decode step
    torch.cuda.synchronize()
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    out = decoder.generate(idx, new_tokens)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert out.shape == (batch, 1 + new_tokens)
    return batch * new_tokens / seconds, warm_up


def run(models=tuple(MODELS), batches=(1, 16), backends=("triton", "sdpa"), new_tokens: int = 1000,
        print_fn=print) -> list[dict]:
    if not torch.cuda.is_available():
        raise RuntimeError("the sampling benchmark needs a CUDA GPU")
    rows = []
    for name in models:
        for backend in backends:
            torch.manual_seed(0)
            model = GPT(model_config(name, backend)).to("cuda", torch.bfloat16).eval()
            for batch in batches:
                tps, warm_up = tokens_per_second(model, batch, new_tokens)
                rows.append(dict(model=name, attention=backend, batch=batch, new_tokens=new_tokens,
                                 tokens_per_s=tps, ms_per_step=1e3 * batch / tps, warm_up_s=warm_up))
                print_fn(f"{name} {backend} batch {batch}: {tps:,.0f} tokens/s")
            del model
            torch.cuda.empty_cache()
    print_fn(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, {new_tokens} new tokens "
             f"after a warm-up, temperature 0.8, top-k 200")
    print_fn("| model | attention | batch | tokens/s | ms per step | warm-up s |\n|---|---|---|---|---|---|")
    for r in rows:
        print_fn(f"| {r['model']} | {r['attention']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                 f"{r['ms_per_step']:.3f} | {r['warm_up_s']:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m minigpt.bench_sample", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--attention", nargs="+", choices=("triton", "sdpa", "naive"), default=["triton", "sdpa"])
    p.add_argument("--new_tokens", type=int, default=1000)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        p.error(f"--batch {args.batch}: every value must be >= 1")
    if args.new_tokens < 1:
        p.error(f"--new_tokens {args.new_tokens}: must be >= 1")
    rows = run(args.models, args.batch, args.attention, args.new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
