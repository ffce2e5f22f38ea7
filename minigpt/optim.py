"""The optimizers GPTModule trains with: AdamW for every parameter, or Muon for the blocks' matrices.

- ``adamw``: AdamW with weight decay on the matrices (Linear weights, the token embedding) and none on
  biases and norm gains; fused on CUDA (one kernel updates every parameter).
- ``muon``: ``torch.optim.Muon`` for the 2-D weights inside the transformer blocks (attention and MLP
  projections), AdamW as above for the rest: the token embedding, tied with the output head, and the
  gains and biases. Muon replaces a matrix's update by the semi-orthogonal matrix nearest its momentum
  (a few Newton-Schulz iterations), so every direction of the update moves at the same rate; it is
  defined for hidden-layer matrices, not for embeddings, the head or vectors (Jordan et al., "Muon: an
  optimizer for hidden layers in neural networks", 2024). On the char GPT it reaches a given validation
  loss in fewer steps than AdamW (bench/NOTES.md, "Time to loss").

Both come back as one ``torch.optim.Optimizer``, so Lightning's automatic optimization, the learning-rate
schedule (one factor over every parameter group: each group keeps its own peak) and checkpoints see a
single optimizer.
"""

from collections.abc import Callable

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")


class MuonWithAdamW(torch.optim.Optimizer):
    """Steps a Muon and an AdamW as one optimizer. ``param_groups`` are the two optimizers' own group
    dicts, read anew at every access (loading a state replaces them), so a scheduler that sets
    ``group["lr"]`` sets theirs."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = None, None
        super().__init__([p for o in (muon, adamw) for g in o.param_groups for p in g["params"]], {})
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        if self.muon is None:  # inside the base class's __init__: its own list, dropped afterwards
            return self._init_groups
        return self.adamw.param_groups + self.muon.param_groups  # AdamW's first: train/lr is learning_rate's

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self._init_groups = groups

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def make_optimizer(
    model: nn.Module,
    name: str,
    is_matrix: Callable[[str], bool],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    muon_lr: float,
    muon_momentum: float,
    fused: bool,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (adamw | muon) over ``model``'s trainable parameters.

    ``is_matrix(name)`` says whether a parameter was built 2-D (known from before any wrapper flattened the
    parameters, as FSDP does). Muon's matrices take ``muon_lr`` and no weight decay; AdamW's take
    ``lr``, decaying the matrices by ``weight_decay``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer={name!r}: must be one of {OPTIMIZERS}")
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hidden = name == "muon"

    def to_muon(n: str) -> bool:
        return hidden and is_matrix(n) and ".h." in f".{n}"  # a matrix inside a transformer block

    muon_params = [p for n, p in params if to_muon(n)]
    if hidden and any(p.dim() != 2 for p in muon_params):
        raise ValueError("optimizer='muon' needs whole 2-D weights; sharded (FSDP) parameters are flat: "
                         "use optimizer='adamw' with FSDP")
    rest = [(n, p) for n, p in params if not to_muon(n)]
    groups = [
        {"params": [p for n, p in rest if is_matrix(n)], "weight_decay": weight_decay},
        {"params": [p for n, p in rest if not is_matrix(n)], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), fused=fused)
    if not hidden:
        return adamw
    muon = torch.optim.Muon(muon_params, lr=muon_lr, momentum=muon_momentum, weight_decay=0.0,
                            adjust_lr_fn="original")
    return MuonWithAdamW(muon, adamw)

