"""GPTModule: the model settings come from GPTConfig alone; the optimizer's decay groups, also under FSDP.

Training through the module end to end is tested in tests/test_train.py.
"""

import dataclasses
import inspect

import lightning as L
import pytest
import torch

from minigpt.model import GPTConfig
from minigpt.module import GPTModule, built_name

TINY = dict(block_size=24, vocab_size=67, n_layer=2, n_head=4, n_embd=32)


def test_model_settings_are_written_once():
    """GPTModule's own signature holds its training settings only; the GPTConfig fields pass through
    under their own names, and every one of them lands in the hyperparameters (what a checkpoint rebuilds
    the GPT from), also those left at their defaults."""
    own = set(inspect.signature(GPTModule.__init__).parameters) - {"self", "model_config"}
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    assert not own & fields, f"GPTModule repeats GPTConfig fields: {own & fields}"
    module = GPTModule(learning_rate=3e-3, **TINY, rope=True)
    assert module.model.config == GPTConfig(**TINY, rope=True)
    assert fields <= set(module.hparams), fields - set(module.hparams)
    assert module.hparams.rope is True and module.hparams.norm == "layernorm"  # a default, recorded
    assert module.hparams.learning_rate == 3e-3


def test_unknown_and_bad_model_settings_fail_clearly():
    with pytest.raises(TypeError, match=r"\['n_layers'\]: neither its arguments nor fields of GPTConfig"):
        GPTModule(n_layers=2)
    with pytest.raises(ValueError, match=r"n_embd=65: must be divisible by n_head=6"):
        GPTModule(n_embd=65)
    with pytest.raises(ValueError, match=r"betas=\[0.9, 1.0\]: must be two numbers in \[0, 1\)"):
        GPTModule(betas=(0.9, 1.0))


def configured_optimizer(module: GPTModule) -> torch.optim.Optimizer:
    trainer = L.Trainer(accelerator="cpu", max_steps=10, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    return module.configure_optimizers()["optimizer"]


def test_optimizer_decays_the_matrices_only():
    module = GPTModule(**TINY, bias=True, weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95))
    decay, no_decay = configured_optimizer(module).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == module.model.num_params(non_embedding=False)
    assert decay["lr"] == pytest.approx(1e-3 / 101) and decay["betas"] == (0.9, 0.95)  # warmup's first step


def test_optimizer_groups_and_counts_survive_sharded_parameters():
    """FSDP turns every parameter into a 1-D view of its rank's shard (and may prefix the names): the
    decay groups and the parameter count still follow the shapes the model was built with."""
    module = GPTModule(**TINY, bias=True)
    built = [[p.numel() for p in g["params"]] for g in configured_optimizer(module).param_groups]
    model = module.model
    n = model.num_params(), model.num_params(False)
    for p in model.parameters():
        p.data = p.data.flatten()[: max(1, p.numel() // 2)]  # this rank's half, flattened
    sharded = configured_optimizer(module).param_groups
    assert [len(g["params"]) for g in sharded] == [len(b) for b in built]
    assert all(p.dim() == 1 for g in sharded for p in g["params"])
    assert (model.num_params(), model.num_params(False)) == n
    assert built_name("h.0._fsdp_wrapped_module._orig_mod.attn.c_attn.weight") == "h.0.attn.c_attn.weight"
