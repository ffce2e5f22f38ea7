"""A GPT language model in one file, read top to bottom.

GPTConfig first, then the parts in the order a forward pass uses them: rotary embeddings and the KV cache
(both optional), CausalSelfAttention, MLP, Block, GPT, and last the sampler that GPT.generate calls.

The defaults are GPT-2's architecture at a small size: learned position embeddings, LayerNorm, a GELU MLP,
pre-norm residual blocks and a token embedding tied to the output head. Options switch on the pieces of
newer models: rotary position embeddings, RMSNorm, QK-norm, ReLU² and SwiGLU MLPs, and grouped-query
attention (n_kv_head < n_head). Attention itself is one call into minigpt.attention (triton | sdpa | naive).

References:
1) GPT-2: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", and OpenAI's code:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) nanoGPT, whose reading order, names and MFU estimate this file follows:
   https://github.com/karpathy/nanoGPT/blob/master/model.py
3) RoPE: Su et al. 2021, "RoFormer", https://arxiv.org/abs/2104.09864
4) RMSNorm: Zhang & Sennrich 2019, https://arxiv.org/abs/1910.07467
5) Grouped-query attention: Ainslie et al. 2023, https://arxiv.org/abs/2305.13245
6) SwiGLU: Shazeer 2020, "GLU Variants Improve Transformer", https://arxiv.org/abs/2002.05202
7) ReLU²: So et al. 2021, "Primer", https://arxiv.org/abs/2109.08668
8) QK-norm: Dehghani et al. 2023, "Scaling Vision Transformers to 22B Parameters", https://arxiv.org/abs/2302.05442
9) Nucleus (top-p) sampling: Holtzman et al. 2019, https://arxiv.org/abs/1904.09751
"""

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.attention import Backend, attention, decode_attention

Norm = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "relu2", "swiglu"]


@dataclass
class GPTConfig:
    """The shape of a GPT and its optional parts; these fields are also the `model:` keys of train.py's
    config (GPTModule takes them as they are).

    Args:
        block_size: longest sequence the model reads, in tokens (the data's window length too).
        vocab_size: tokens in the vocabulary (train.py sets it from the tokenizer; 257 is the byte one).
        vocab_multiple: round the embedding and output rows up to a multiple of this (64 speeds up GPT-2's
            50257-token output matmul); the extra rows are never predicted (masked out of the softmax).
        n_layer: transformer blocks.
        n_head: query heads per attention layer.
        n_kv_head: key/value heads: None = n_head, fewer = grouped-query attention, 1 = multi-query.
        n_embd: width of the residual stream.
        dropout: dropout probability in training (embeddings, attention, residual branches).
        bias: biases in the Linear layers and LayerNorms.
        attention: attention backend: triton | sdpa | naive, or auto (triton on CUDA, sdpa elsewhere).
        rope: rotary position embeddings instead of learned ones.
        norm: layernorm | rmsnorm.
        qk_norm: RMSNorm (no gain) on every query and key head before attention.
        mlp: gelu | relu2 | swiglu.
    """

    block_size: int = 256
    vocab_size: int = 257
    vocab_multiple: int = 1
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    attention: Backend = "auto"
    rope: bool = False
    norm: Norm = "layernorm"
    qk_norm: bool = False
    mlp: MLPKind = "gelu"

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        sizes = ("block_size", "vocab_size", "vocab_multiple", "n_layer", "n_head", "n_kv_head", "n_embd")
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd}: must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head={self.n_head}: must be divisible by n_kv_head={self.n_kv_head}")
        if self.rope and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(
                f"rope=True needs an even head size n_embd // n_head, got {self.n_embd} // {self.n_head}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout}: must lie in [0, 1)")
        self.padded_vocab_size = -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
        for name, kind in (("attention", Backend), ("norm", Norm), ("mlp", MLPKind)):
            value, allowed = getattr(self, name), get_args(kind)
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: allowed: {' | '.join(allowed)}")


def make_norm(config: GPTConfig, dim: int) -> nn.Module:
    return nn.RMSNorm(dim) if config.norm == "rmsnorm" else nn.LayerNorm(dim, bias=config.bias)


def rope_tables(block_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (block_size, head_dim // 2): position t turns pair i by t * base^(-2i / head_dim)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim // 2,)
    angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[..., i], x[..., i + D/2]) of x (B, H, T, D) by the angles of their positions."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, D/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, D/2), broadcast over B and H
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, T, D)


class KVCache:
    """The keys and values one layer has seen while generating, in buffers preallocated for max_len tokens."""

    # None: the host knows the length and update() returns exactly the stored tokens. A static cache
    # (minigpt.decode) sets it to a device tensor of lengths in a captured decode step.
    lengths: torch.Tensor | None = None

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0  # tokens stored so far: slots [0, pos) of the buffers
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, H_kv, T, D); return the keys and values of all tokens so far, (B, H_kv, pos, D)."""
        B, H_kv, T, D = k.shape
        if self.k is None:  # allocated on first use, in the dtype the layer computes in (bf16 under autocast)
            self.k = k.new_empty(B, H_kv, self.max_len, D)
            self.v = v.new_empty(B, H_kv, self.max_len, D)
        self.k[:, :, self.pos : self.pos + T] = k
        self.v[:, :, self.pos : self.pos + T] = v
        self.pos += T
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        # one projection for all heads: n_head query heads, then n_kv_head key heads and n_kv_head value heads
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.qk_norm = config.qk_norm
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout
        self.backend = config.attention

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None):
        B, T, C = x.size()  # batch, sequence length, n_embd
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, H_kv * D, H_kv * D], dim=2)
        # q, k, v stay strided views of the one projection: no copies
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, T, H * D) -> (B, H, T, D)
        k = k.view(B, T, H_kv, D).transpose(1, 2)  # (B, T, H_kv * D) -> (B, H_kv, T, D)
        v = v.view(B, T, H_kv, D).transpose(1, 2)  # (B, T, H_kv * D) -> (B, H_kv, T, D)
        if self.qk_norm:  # every head's q and k to unit RMS: the attention logits cannot grow without bound
            q, k = F.rms_norm(q, (D,)), F.rms_norm(k, (D,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v)  # (B, H_kv, S, D): every token so far; the T queries are the last T
        if cache is not None and cache.lengths is not None:  # a decode step against a static cache
            y = decode_attention(q, k, v, cache.lengths, self.backend)  # (B, H, T, D)
        else:
            y = self._attend(q, k, v)  # (B, H, T, D); minigpt.timing can wrap this call to time it
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v, self.backend, dropout_p=self.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind = config.mlp
        hidden = 4 * config.n_embd
        if config.mlp == "swiglu":  # three matrices instead of two: 2/3 the width keeps the parameter count
            hidden = (8 * config.n_embd // 3 + 63) // 64 * 64
        fc_out = 2 * hidden if config.mlp == "swiglu" else hidden  # swiglu: gate and value from one matmul
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)  # (B, T, fc_out)
        if self.kind == "gelu":
            x = F.gelu(x)
        elif self.kind == "relu2":
            x = F.relu(x).square()
        else:  # swiglu
            gate, value = x.chunk(2, dim=-1)  # (B, T, hidden) each
            x = F.silu(gate) * value
        return self.dropout(self.c_proj(x))  # (B, T, hidden) -> (B, T, C)


class Block(nn.Module):
    """A pre-norm transformer block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple | None = None, cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        parts = dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd))
        if not config.rope:  # with rope, positions enter through the rotation of q and k instead
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        parts["drop"] = nn.Dropout(config.dropout)
        parts["h"] = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        parts["ln_f"] = make_norm(config, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one matrix reads and writes tokens
        if config.rope:
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: projections into the residual stream scale with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # counted as built (under FSDP the parameters become shards of each rank); the tied matrix once
        self._n_params = sum(p.numel() for p in self.parameters())

    def _init_weights(self, module: nn.Module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters; non_embedding leaves out the position embeddings (the token embedding counts, being
        tied to lm_head), as nanoGPT counts them."""
        n = self._n_params
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd  # padding rows
        if non_embedding and not self.config.rope:
            n -= self.config.block_size * self.config.n_embd  # wpe
        return n

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: list[KVCache] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) and the mean cross-entropy loss for token ids idx (B, T) and targets
        (B, T) (-1 = ignore). Without targets, only the last position's logits (B, 1, vocab_size) and None.
        With kv_cache (one KVCache per layer) idx continues the cached tokens."""
        B, T = idx.size()
        start = kv_cache[0].pos if kv_cache is not None else 0  # position of idx[:, 0] in the sequence
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence length {start + T} is longer than block_size={self.config.block_size}"
            )
        x = self.transformer.wte(idx)  # (B, T, C)
        rope = None
        if self.config.rope:
            rope = (self.rope_cos[start : start + T], self.rope_sin[start : start + T])  # (T, D/2) each
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.transformer.wpe(pos)  # (B, T, C) + (T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, kv_cache[i] if kv_cache is not None else None)
        x = self.transformer.ln_f(x)

        if targets is not None:
            logits = self.lm_head(x)  # (B, T, padded vocab)
            V = self.config.vocab_size
            if V < logits.size(-1):  # padding: probability 0, gradient 0 (lm_head's backward never reads it)
                logits[..., V:] = float("-inf")
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # (B, 1, padded vocab): sampling needs the last position
            loss = None
        return logits[..., : self.config.vocab_size], loss

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward), nanoGPT's estimate after the PaLM paper (app. B):
        6N for the N weights (a multiply-add is 2 FLOPs forward, twice that backward), plus 12*L*H*Q*T for
        the two (T x T) attention matmuls per head at T = block_size, the causal half not discounted."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.num_params() + 12 * L * H * Q * T

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_kv_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue the prompts idx (B, T) by max_new_tokens sampled tokens; returns (B, T + max_new_tokens).

        With the KV cache (default) the prompt is read once (prefill), then each step feeds only the newest
        token, whose attention reads the cached keys and values of every earlier token. The cache holds
        block_size tokens, so prompt + max_new_tokens must fit in block_size. On CUDA the cache is static
        and the decode step is replayed as a CUDA graph (minigpt.decode); on the CPU it grows step by step.
        Without the cache each step reads the whole sequence again, cropped to its last block_size tokens
        as in nanoGPT, so generation can run past block_size. See sample() for temperature, top_k and
        top_p; pass a seeded generator (on idx's device) for reproducible samples. Dropout is off while
        generating (eval mode); the mode is restored after.
        """
        block_size = self.config.block_size
        if idx.dim() != 2 or idx.size(1) == 0:
            raise ValueError(f"idx must be token ids of shape (B, T) with T >= 1, got {tuple(idx.shape)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if idx.size(1) > block_size:
            raise ValueError(f"prompt length {idx.size(1)} is longer than block_size={block_size}")
        if use_kv_cache and idx.size(1) + max_new_tokens > block_size:
            raise ValueError(
                f"prompt length {idx.size(1)} + max_new_tokens {max_new_tokens} is longer than "
                f"block_size={block_size}, the size of the KV cache; generate fewer tokens or pass "
                f"use_kv_cache=False (the context is then cropped to the last block_size tokens)"
            )
        check_sampling(temperature, top_k, top_p)
        if use_kv_cache and idx.is_cuda:
            from minigpt.decode import Decoder  # imported here: minigpt.decode builds on this module

            return Decoder(self, temperature, top_k, top_p, generator).generate(idx, max_new_tokens)

        was_training = self.training
        self.eval()
        cache = [KVCache(block_size) for _ in self.transformer.h] if use_kv_cache else None
        # a compiled model (model.compile()) would recompile for every new length: generate eagerly
        with torch.compiler.set_stance("force_eager"):
            for _ in range(max_new_tokens):
                if cache is None:
                    logits, _ = self(idx[:, -block_size:])  # the whole (cropped) sequence every step
                elif cache[0].pos == 0:
                    logits, _ = self(idx, kv_cache=cache)  # prefill: the prompt in one pass
                else:
                    logits, _ = self(idx[:, -1:], kv_cache=cache)  # decode: the newest token, cached keys
                next_id = sample(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                idx = torch.cat((idx, next_id), dim=1)  # (B, T + 1)
        self.train(was_training)
        return idx


def check_sampling(temperature: float, top_k: int | None, top_p: float | None):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token id per row of logits (B, V); returns (B, 1).

    temperature divides the logits (below 1 sharper, above 1 flatter; 0 takes the most likely token).
    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens whose
    probability reaches top_p (nucleus sampling). Both may be given: top-k filters first.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        probs, order = F.softmax(logits, dim=-1).sort(dim=-1, descending=True)  # (B, V) each
        # drop a token once the more likely ones before it reach top_p; the most likely token always stays
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    # The draw torch.multinomial makes for one sample (argmax of p / q, q ~ Exp(1): the Gumbel-max trick),
    # without its check of probs on the host, which would stop a CUDA graph capture of the decode step.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)  # (B, 1)
