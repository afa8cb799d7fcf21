"""What tests/test_cached.py and tests/test_cached_distributed.py share: small float64 towers with
dropout, the three losses of the acceptance (CLIP with a learnable scale, SigLIP with a learnable
scale and bias, SupCon over two views of one encoder), and the plain step they are checked against.

The plain step embeds the same chunks in the same order with a graph (so that dropout draws the
same numbers as the cached step's first pass, which is what the cached step's replay reproduces),
concatenates, and backpropagates the loss once: the gradient ``loss_fn(*[enc(inp) ...]).backward()``
gives for that draw.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import fastcl

D_IN, D_OUT = 6, 5


class Tower(nn.Module):
    """Linear -> Dropout -> GELU -> Linear; optionally holding the loss's learnable scale and bias
    (so that a DDP-wrapped tower owns parameters only the loss uses)."""

    def __init__(self, seed: int, dropout: float, scale: bool = False, bias: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(D_IN, 16), nn.Dropout(dropout), nn.GELU(), nn.Linear(16, D_OUT)).double()
        if scale:
            self.log_scale = nn.Parameter(torch.tensor(1.2, dtype=torch.float64))
        if bias:
            self.bias = nn.Parameter(torch.tensor(-0.7, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


@dataclass
class Setup:
    encoders: list     # callables, one per tower
    inputs: list       # one per tower
    loss_fn: object
    params: dict       # name -> parameter whose gradient is compared


def build(loss: str, rows: int, *, dropout: float, seed: int = 0, data_seed: int = 1, distributed: bool = False,
          wrap=lambda module: module, rank: int = 0, world: int = 1) -> Setup:
    """The towers (wrapped by ``wrap``, e.g. in DDP) and this rank's ``rows`` of a global batch of
    ``rows * world`` (the single process: ``world = 1``)."""
    api = fastcl.distributed if distributed else fastcl
    gen = torch.Generator().manual_seed(data_seed)
    total = rows * world
    a, b = torch.randn(total, D_IN, generator=gen, dtype=torch.float64), torch.randn(total, D_IN, generator=gen,
                                                                                    dtype=torch.float64)
    labels = torch.randint(0, 3, (total,), generator=gen)
    mine = slice(rank * rows, (rank + 1) * rows)
    a, b, labels = a[mine], b[mine], labels[mine]
    if loss == "supcon":  # two views through one encoder
        enc = Tower(seed, dropout)
        wrapped = wrap(enc)
        params = {f"enc.{n}": p for n, p in enc.named_parameters()}
        return Setup([wrapped, wrapped], [a, b],
                     lambda u, v: api.supcon_loss(torch.stack([u, v]), labels, temperature=0.5), params)
    img, txt = Tower(seed, dropout), Tower(seed + 1, dropout, scale=True, bias=loss == "siglip")
    params = {**{f"img.{n}": p for n, p in img.named_parameters()},
              **{f"txt.{n}": p for n, p in txt.named_parameters()}}
    if loss == "clip":
        def loss_fn(u, v):
            return api.clip_loss(u, v, txt.log_scale.exp())
    elif loss == "siglip":
        def loss_fn(u, v):
            return api.siglip_loss(u, v, txt.log_scale.exp(), txt.bias)
    else:
        raise ValueError(loss)
    return Setup([wrap(img), wrap(txt)], [a, b], loss_fn, params)


def plain_loss(setup: Setup, chunk_size: int, encoders=None, inputs=None) -> torch.Tensor:
    """The reference's loss: chunks embedded with a graph in the cached step's order."""
    embeddings = []
    for enc, inp in zip(encoders or setup.encoders, inputs or setup.inputs):
        embeddings.append(torch.cat([enc(inp[a:a + chunk_size]) for a in range(0, inp.shape[0], chunk_size)]))
    return setup.loss_fn(*embeddings)


def plain_step(setup: Setup, chunk_size: int, encoders=None) -> torch.Tensor:
    """The reference: ``plain_loss``, one backward."""
    loss = plain_loss(setup, chunk_size, encoders)
    loss.backward()
    return loss.detach()


def grads(setup: Setup) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in setup.params.items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)
