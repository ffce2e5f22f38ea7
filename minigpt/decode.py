"""Sampling at the speed of the GPU: a static KV cache and a decode step replayed as a CUDA graph.

A decode step of a small GPT is a few microseconds of GPU work in hundreds of kernel launches, so eager
PyTorch spends the step on the host. Here every step has the same shapes and reads its position from a
device tensor, so the step is captured once as a CUDA graph and replayed per token:

- The cache (StaticKVCache, one per layer) is preallocated at (B, H_kv, block_size, D). A prefill (the
  prompt, in one eager pass through GPT.forward and the flash kernel) writes its first slots; a decode
  step writes one slot at the device position and attends through minigpt.attention.decode_attention,
  which reads the lengths on the GPU (our split-KV kernel for ``triton``, masked SDPA for ``sdpa``).
- The newest token, the position and the lengths live in device buffers; sampling (temperature, top-k,
  top-p, a seeded generator) runs inside the graph, so the host only replays it: no step waits for the GPU.
- When the sequence reaches block_size tokens the cache is refilled as a new prefill from the last
  block_size // 2 tokens, so generation goes on past block_size, always reading between half a block and
  a block of context (the rule of python -m minigpt.sample).

On the CPU the same step runs eagerly (graph=False), which the tests use to compare it with GPT.forward.
"""

import contextlib
from collections.abc import Callable

import torch

from minigpt.model import GPT, KVCache, check_sampling, sample


class StaticKVCache(KVCache):
    """One layer's keys and values in buffers of a fixed shape, for a decode step with a device position.

    A prefill (``lengths`` None) appends at the host position ``pos`` like KVCache. In a decode step
    (``lengths`` set to the decoder's device tensor) update() writes the token at the device ``position``
    and returns the whole buffers: attention reads each sequence's first lengths[b] slots of them.
    """

    def __init__(self, max_len: int, position: torch.Tensor):
        super().__init__(max_len)
        self.position = position  # (1,) int64 on the device: the slot a decode step writes

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None:  # zeros: SDPA's masked weights are 0, and 0 * NaN from unwritten slots is NaN
            B, H_kv, T, D = k.shape
            self.k = k.new_zeros(B, H_kv, self.max_len, D)
            self.v = v.new_zeros(B, H_kv, self.max_len, D)
        if self.lengths is None:
            return super().update(k, v)  # a prefill: (B, H_kv, pos, D)
        self.k.index_copy_(2, self.position, k)  # (B, H_kv, 1, D) into slot `position`
        self.v.index_copy_(2, self.position, v)
        return self.k, self.v  # (B, H_kv, max_len, D)


class Decoder:
    """Generates from a GPT with a static KV cache and, on CUDA, a decode step captured as a CUDA graph.

    The sampling settings are fixed for the decoder's life (they are part of the captured step); see
    minigpt.model.sample for their meaning. One decoder serves any number of generate() calls; the graph is
    captured at the first decode step and replayed after, until the batch size, the autocast setting or the
    model's weights (moved or cast: new memory) change, which make new buffers and a new graph. graph:
    capture the step (default: on CUDA); False runs the same step eagerly.
    """

    def __init__(
        self,
        model: GPT,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        graph: bool | None = None,
    ):
        check_sampling(temperature, top_k, top_p)
        self.model = model
        self.device = model.lm_head.weight.device
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(
                f"generator is on {generator.device}, the model on {self.device}: pass "
                f"torch.Generator({self.device.type!r}) so that sampling draws on the model's device"
            )
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True needs a model on CUDA, got one on {self.device}")
        self.sampling = (temperature, top_k, top_p, generator)
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        self.signature = None  # what the buffers and the graph were made for; the first generate() sets it

    def _signature(self, B: int) -> tuple:
        """What the buffers and the captured graph depend on: the batch size, the dtype the step computes
        in, and where the weights live (a captured graph reads them at the addresses it saw)."""
        kind = self.device.type
        autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        weight = self.model.lm_head.weight
        return B, autocast, weight.dtype, weight.data_ptr()

    def _allocate(self, signature: tuple):
        """The step's device buffers for ``signature`` (see _signature); drops the captured graph."""
        block_size = self.model.config.block_size
        self.signature, B = signature, signature[0]
        # the sequence as the cache holds it, plus the newest sampled token (not yet in the cache)
        self.tokens = torch.zeros(B, block_size + 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # slot of the newest token
        self.lengths = torch.zeros(B, dtype=torch.int32, device=self.device)  # position + 1 per sequence
        self.caches = [StaticKVCache(block_size, self.position) for _ in self.model.transformer.h]
        self.graph = None

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, on_token: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """Continue the prompts idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).

        Past block_size the cache is refilled from the last block_size // 2 tokens (a new prefill).
        on_token() is called once per new token as the host queues it (the GPU may still be computing).
        """
        block_size = self.model.config.block_size
        if idx.dim() != 2 or idx.size(1) == 0 or idx.device != self.device:
            raise ValueError(
                f"idx must be token ids of shape (B, T) with T >= 1 on {self.device}, got "
                f"{tuple(idx.shape)} on {idx.device}"
            )
        if idx.size(1) > block_size:
            raise ValueError(f"prompt length {idx.size(1)} is longer than block_size={block_size}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if block_size < 2:
            raise ValueError(f"block_size={block_size}: generating with a KV cache needs block_size >= 2")
        signature = self._signature(idx.size(0))
        if signature != self.signature:
            self._allocate(signature)

        was_training = self.model.training
        self.model.eval()
        on_device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        # a compiled model (model.compile()) would recompile for new lengths: its modules run eagerly here
        with torch.compiler.set_stance("force_eager"), on_device:
            try:
                new = self._rounds(idx, max_new_tokens, on_token or (lambda: None))
            finally:
                self.model.train(was_training)
        return torch.cat([idx, *new], dim=1)

    def _rounds(self, idx: torch.Tensor, max_new_tokens: int, tick: Callable[[], None]) -> list[torch.Tensor]:
        """Rounds of a prefill and decode steps until the sequence fills the block, then a refill: the new
        tokens of each round, (B, n) each."""
        block_size = self.model.config.block_size
        keep = block_size // 2  # context kept when the sequence fills the block
        # a fresh cache from the whole prompt if it leaves room, else from its last `keep` tokens
        context = idx if idx.size(1) < block_size else idx[:, -keep:]
        new = []
        while max_new_tokens > 0:
            T = context.size(1)
            n = min(max_new_tokens, block_size - T)  # tokens until the sequence fills the block
            self._prefill(context)  # the prompt's keys and values, and the first new token
            tick()
            for _ in range(n - 1):
                self._decode()  # one token per step: the newest one's keys and values, the next token
                tick()
            new.append(self.tokens[:, T : T + n].clone())
            max_new_tokens -= n
            context = self.tokens[:, T + n - keep : T + n].clone()  # the refill, if tokens are left
        return new

    def _prefill(self, context: torch.Tensor):
        """An eager pass over context (B, T) from an empty cache; samples the token at position T."""
        B, T = context.shape
        for cache in self.caches:
            cache.pos, cache.lengths = 0, None  # host positions: GPT.forward and the flash kernel
        logits, _ = self.model(context, kv_cache=self.caches)  # (B, 1, vocab_size)
        self.tokens[:, :T] = context
        self.tokens[:, T : T + 1] = sample(logits[:, -1, :], *self.sampling)
        self.position.fill_(T)
        self.lengths.fill_(T + 1)

    def _decode(self):
        """One decode step: eagerly, or by replaying the graph (captured after a first eager run)."""
        if not self.use_graph:
            return self._step()
        if self.graph is not None:
            return self.graph.replay()
        # Warm up on a side stream (Triton compiles, cuBLAS picks its kernels): this first step is real.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step()
        torch.cuda.current_stream().wait_stream(side)
        # Capture the next step without running it. Autocast must not reuse the weights it cast in the
        # warm-up: the graph would read a cache that is freed once the caller's autocast region ends.
        graph = torch.cuda.CUDAGraph()
        generator = self.sampling[3]
        if generator is not None:
            graph.register_generator_state(generator)  # each replay draws new numbers from it
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.autocast("cuda", dtype, enabled=autocast, cache_enabled=False):
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._step()
        self.graph = graph

    def _step(self):
        """GPT.forward for the newest token at the device position, then the next token sampled into
        the buffers and the position advanced: the work the graph captures."""
        model, config = self.model, self.model.config
        token = self.tokens.index_select(1, self.position)  # (B, 1): the newest token
        x = model.transformer.wte(token)  # (B, 1, C)
        rope = None
        if config.rope:  # (1, D/2) each: the angles of this position, cast once for every layer
            dtype = self.caches[0].k.dtype  # the dtype the layers compute in
            rope = tuple(table.index_select(0, self.position).to(dtype)
                         for table in (model.rope_cos, model.rope_sin))
        else:
            x = x + model.transformer.wpe(self.position)  # (B, 1, C) + (1, C)
        x = model.transformer.drop(x)
        for block, cache in zip(model.transformer.h, self.caches):
            cache.lengths = self.lengths  # attention reads each sequence's first lengths[b] slots
            x = block(x, rope, cache)
        x = model.transformer.ln_f(x)
        logits = model.lm_head(x)[:, -1, : config.vocab_size]  # (B, vocab_size)
        self.tokens.index_copy_(1, self.position + 1, sample(logits, *self.sampling))
        self.position.add_(1)
        self.lengths.add_(1)
