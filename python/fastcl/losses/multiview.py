"""Multi-view losses of Koromilas et al. 2025, "A Principled Framework for Multi-View Contrastive
Learning": MV-InfoNCE and MV-DHEL. ``views [V, B, D]``, ``S`` between all ``V * B`` rows.

The positive terms only pair views of one sample (``V x V`` per sample, O(B V^2 D)); only the
negatives' log-sum-exp over the batch needs the tiled engine.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from ._common import engine_for, finish, maybe_normalize, upcast
from ._plan import LOCAL
from .ntxent import _first


def mv_infonce_loss(views, temperature: float | torch.Tensor = 0.1, *, reduction: str = "mean", normalize: bool = False,
                    backend: str = "auto") -> torch.Tensor:
    r"""MV-InfoNCE, one term per sample ``b``:

    ``l_b = -log sum_{v != w} exp S((v,b),(w,b)) + log sum_v sum_{j != (v,b)} exp S((v,b), j)``

    ``mean`` over ``b``; ``none`` gives ``[B]``.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    return _mv_infonce(LOCAL, views, temperature, reduction=reduction, normalize=normalize, backend=backend)


def mv_dhel_loss(views, temperature: float | torch.Tensor = 0.1, *, reduction: str = "mean", normalize: bool = False,
                 backend: str = "auto") -> torch.Tensor:
    r"""MV-DHEL: alignment decoupled from uniformity; negatives only within the same view.

    ``l_b = -log sum_{v < w} exp S((v,b),(w,b)) + sum_v log sum_{j != b} exp S((v,b),(v,j))``

    ``mean`` over ``b``; ``none`` gives ``[B]``. Needs ``B >= 2``.

    ``temperature`` is a positive number (Python or NumPy) or a one-element floating tensor: a
    tensor (an ``nn.Parameter``, or ``log_t.exp()`` to keep it positive) is learned, its gradient
    flowing on every backend and in ``fastcl.distributed``. Tensor values are not range-checked
    (reading one would cost a device sync every step); a non-finite one gives a NaN loss.
    """
    return _mv_dhel(LOCAL, views, temperature, reduction=reduction, normalize=normalize, backend=backend)


def _mv_infonce(world, views, temperature, *, reduction, normalize, backend):
    return _multiview(world, views, temperature, reduction=reduction, normalize=normalize, backend=backend, dhel=False)


def _mv_dhel(world, views, temperature, *, reduction, normalize, backend):
    return _multiview(world, views, temperature, reduction=reduction, normalize=normalize, backend=backend, dhel=True)


def _multiview(world, views, temperature, *, reduction, normalize, backend, dhel):
    """Both losses in ``world`` (``fastcl.losses._plan``); over a process group ``views [V, B_local, D]``:
    a sample's views stay on its rank, so its positives are local."""
    def validate():
        z = check.views("views", views)
        if dhel:
            check.min_rows("views", z.shape[1] * world.size, 2, "MV-DHEL's negatives are the other samples of "
                           "the same view")
        return (z, check.reduction(reduction), check.temperature_scale("temperature", temperature, z),
                engine_for(world, backend, z, "lse"))

    z, reduction, s, engine = world.checked(validate, _first, views=_first)
    z0, z = z, maybe_normalize(z, normalize)
    plan = world.plan(engine)
    if engine is None:
        return finish(plan.reduce(_reference(z, s, dhel), reduction), z0.dtype, z0, s)
    v, b, _ = z.shape
    if dhel:  # one B x B self-excluded pass per view
        ids = plan.ids(b, z)
        negatives = sum(plan.lse(z[i], z[i], s, (ids, ids), b).row_lse for i in range(v))
    else:
        flat = z.reshape(v * b, -1)
        ids = plan.ids(v * b, z)
        negatives = plan.lse(flat, flat, s, (ids, ids), v * b).row_lse.view(v, b).logsumexp(0)
    return finish(plan.reduce(negatives - _positive_lse(z, s, dhel), reduction), z0.dtype, z0, s)


def _positive_lse(z, s, dhel):
    """``log sum exp S((v,b),(w,b))`` over ordered pairs ``v != w`` (MV-InfoNCE) or ``v < w`` (DHEL)."""
    za = upcast(z)
    v = z.shape[0]
    gram = s * torch.einsum("vbd,wbd->bvw", za, za)  # [B, V, V]
    keep = torch.ones(v, v, dtype=torch.bool, device=z.device)
    keep = keep.triu(1) if dhel else keep & ~torch.eye(v, dtype=torch.bool, device=z.device)
    return gram.masked_fill(~keep, float("-inf")).flatten(1).logsumexp(1)


def _reference(z, s, dhel):
    """Both terms read off the materialised ``S [V*B, V*B]`` with explicit masks."""
    v, b, _ = z.shape
    flat = upcast(z).reshape(v * b, -1)
    S = s * flat @ flat.T
    rows = torch.arange(v * b, device=z.device)
    view_of, sample_of = rows // b, rows % b
    same_sample = sample_of[:, None] == sample_of[None, :]
    itself = rows[:, None] == rows[None, :]
    positive = same_sample & (view_of[:, None] < view_of[None, :] if dhel else ~itself)
    pos = S.masked_fill(~positive, float("-inf")).logsumexp(1).view(v, b).logsumexp(0)
    excluded = itself.clone()
    if dhel:
        excluded |= view_of[:, None] != view_of[None, :]
    neg = S.masked_fill(excluded, float("-inf")).logsumexp(1).view(v, b)
    return (neg.sum(0) if dhel else neg.logsumexp(0)) - pos
