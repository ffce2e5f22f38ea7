"""minigpt: a small, fast, readable GPT trainer on our own Triton FlashAttention kernels."""
