"""Sample text from a trained checkpoint.

    python -m minigpt.sample --ckpt runs/shakespeare_char-triton/checkpoints/last.ckpt \\
        --prompt "ROMEO:" --max_new_tokens 500 --temperature 0.8 --top_k 200

The checkpoint alone is enough: the model shape comes from its ``hyper_parameters`` and the tokenizer from
``checkpoint["tokenizer"]``. Generation reads the prompt once and then feeds one token per step against
the KV cache. The cache holds one block: once it is full, it is refilled from the last block_size // 2
tokens and generation goes on, so the model always reads between half a block and a block of context
(nanoGPT re-reads the last block_size tokens at every step, which costs about block_size times more).
On CUDA the model runs in bfloat16 with a static cache, its decode step replayed as a CUDA graph
(minigpt.decode); on the CPU it runs in float32, step by step.
Each sample is printed as prompt + continuation; with several samples a line of dashes separates them.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minigpt.attention import BACKENDS, resolve_backend
from minigpt.decode import Decoder
from minigpt.model import GPT, GPTConfig
from minigpt.tokenizer import tokenizer_from_dict

SEPARATOR = "-" * 40


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", attention: str | None = None):
    """(model in eval mode on `device`, tokenizer) from a training checkpoint."""
    # Our checkpoints hold plain Python objects besides tensors (tokenizer, loop states): not weights-only.
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if "hyper_parameters" not in ckpt or "tokenizer" not in ckpt:
        raise ValueError(f"{path} is not a minigpt training checkpoint (no hyper_parameters or tokenizer)")
    hp = ckpt["hyper_parameters"]
    shape = {f.name: hp[f.name] for f in dataclasses.fields(GPTConfig) if f.name in hp}
    backend = resolve_backend(attention or shape.get("attention", "auto"), device)
    if attention is None and backend == "triton" and torch.device(device).type != "cuda":
        backend = "sdpa"  # trained with the Triton kernel, which needs a GPU: SDPA computes the same
    shape["attention"] = backend
    shape["dropout"] = 0.0
    model = GPT(GPTConfig(**shape))
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state)
    return model.to(device).eval(), tokenizer_from_dict(ckpt["tokenizer"])


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """model.generate with the KV cache, sliding past block_size, under a progress bar over new tokens."""
    block_size = model.config.block_size
    if block_size < 2:
        raise ValueError(f"block_size={block_size}: sampling needs a model of block_size >= 2")
    keep = block_size // 2  # context kept when the cache is full
    bar = tqdm(total=max_new_tokens, unit="tok", desc="sampling", disable=not progress, file=sys.stderr)
    if idx.is_cuda:  # one decoder, its step captured once, refilled by the same rule as below
        try:
            decoder = Decoder(model, temperature, top_k, top_p, generator)
            return decoder.generate(idx, max_new_tokens, on_token=lambda: bar.update(1))
        finally:
            bar.close()
    # generate() runs one forward pass per new token: a forward hook moves the bar
    def tick(*_) -> None:  # a forward hook must return None to leave the output alone
        bar.update(1)

    hook = model.register_forward_hook(tick)
    try:
        first = True
        while max_new_tokens > 0:
            # a fresh cache from the whole prompt the first time (if it leaves room), else the last `keep`
            fits = first and idx.size(1) < block_size
            context = idx if fits else idx[:, -keep:]
            first = False
            n = min(max_new_tokens, block_size - context.size(1))
            out = model.generate(context, n, temperature, top_k, top_p, generator=generator)  # KV cache
            idx = torch.cat((idx, out[:, context.size(1) :]), dim=1)
            max_new_tokens -= n
    finally:
        hook.remove()
        bar.close()
    return idx


def main(argv: list[str] | None = None) -> list[str]:
    """Parse `argv` (default: the command line), print the samples and return them."""
    parser = argparse.ArgumentParser(prog="python -m minigpt.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint file written by train.py")
    parser.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    parser.add_argument("--max_new_tokens", type=int, default=500, help="tokens to generate per sample")
    parser.add_argument("--temperature", type=float, default=0.8, help="< 1 sharper, > 1 flatter, 0 greedy")
    parser.add_argument("--top_k", type=int, default=200, help="sample among the k most likely (0: all)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus sampling: keep this much mass")
    parser.add_argument("--num_samples", type=int, default=1, help="samples to draw (in one batch)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attention", choices=BACKENDS, default=None, help="default: the checkpoint's")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    if not Path(args.ckpt).is_file():
        parser.error(f"--ckpt {args.ckpt}: no such checkpoint file")
    if args.max_new_tokens < 0:
        parser.error(f"--max_new_tokens {args.max_new_tokens}: must be >= 0")
    if args.num_samples < 1:
        parser.error(f"--num_samples {args.num_samples}: must be >= 1")
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature}: must be >= 0 (0 is greedy)")
    if args.top_k < 0:
        parser.error(f"--top_k {args.top_k}: must be >= 0 (0 keeps every token)")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        parser.error(f"--top_p {args.top_p}: must be in (0, 1]")
    top_k = args.top_k or None
    device = torch.device(args.device)
    model, enc = load_checkpoint(args.ckpt, device, args.attention)
    prompt = enc.encode(args.prompt, allowed_special="all")
    block_size = model.config.block_size
    if not prompt:
        parser.error("--prompt is empty: give at least one character")
    if len(prompt) > block_size:
        parser.error(f"--prompt is {len(prompt)} tokens, longer than the model's block_size={block_size}")

    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(args.seed)
    if device.type == "cuda":
        model.to(torch.bfloat16)  # the weights as the matmuls read them under bf16 autocast, cast once
    out = generate(
        model, idx, args.max_new_tokens, args.temperature, top_k, args.top_p, generator,
        progress=not args.no_progress,
    )
    texts = [enc.decode(row.tolist()) for row in out]
    for i, text in enumerate(texts):
        if i:
            print(SEPARATOR)
        print(text)
    return texts


if __name__ == "__main__":
    main()
