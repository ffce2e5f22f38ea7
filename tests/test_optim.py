"""The optimizers: which parameters Muon takes, one schedule over both, checkpoints that resume exactly."""

import copy

import pytest
import torch

from minigpt.model import GPT, GPTConfig
from minigpt.optim import MuonWithAdamW, make_optimizer


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=32, attention="naive"))


def build(model: GPT, name: str) -> torch.optim.Optimizer:
    return make_optimizer(model, name, lambda n: dict(model.named_parameters())[n].dim() >= 2, lr=3e-3,
                          weight_decay=0.1, betas=(0.9, 0.99), muon_lr=0.02, muon_momentum=0.95, fused=False)


def train(model: GPT, opt: torch.optim.Optimizer, steps: int, seed: int = 1, fixed: bool = False) -> list:
    """Steps on random batches, or on one batch again and again (fixed: memorizable, so the loss falls)."""
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        if fixed:
            g.manual_seed(seed)
        idx = torch.randint(0, 37, (4, 17), generator=g)
        _, loss = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    opt = build(model, "muon")
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon and not muon & adamw
    assert muon | adamw == set(names.values())  # every parameter once
    assert all(n.startswith("transformer.h.") and n.endswith(".weight") for n in muon)
    assert "transformer.wte.weight" in adamw  # the embedding, tied with the head, stays with AdamW
    assert all(dict(model.named_parameters())[n].dim() == 2 for n in muon)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_lowers_the_loss(name):
    model = tiny_gpt()
    losses = train(model, build(model, name), 30, seed=2, fixed=True)
    assert losses[-1] < 0.5 * losses[0], losses


def test_one_schedule_scales_each_group_from_its_own_peak():
    model = tiny_gpt()
    opt = build(model, "muon")
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    assert {g["lr"] for g in opt.muon.param_groups} == {0.01}
    assert {g["lr"] for g in opt.adamw.param_groups} == {1.5e-3}


def test_state_dict_resumes_bit_for_bit():
    model = tiny_gpt()
    opt = build(model, "muon")
    train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 3, seed=5)

    resumed = tiny_gpt(seed=9)
    resumed.load_state_dict(saved_model)
    opt2 = build(resumed, "muon")
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, 3, seed=5)
    for (n, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match=r"optimizer='sgd': must be one of \('adamw', 'muon'\)"):
        build(tiny_gpt(), "sgd")
