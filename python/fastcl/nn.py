"""``torch.nn.Module`` wrappers, one per loss, holding the hyper-parameters.

Where a well-known implementation exists, the module is a drop-in for it: same constructor, same
``forward`` signature, same defaults and the same normalisation habit:

- ``ClipLoss``, ``SigLipLoss``: open_clip (features used as given; the model normalises).
- ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``: lightly (normalise inside).
- ``SupConLoss``: pytorch-metric-learning (normalises inside; ``forward(embeddings, labels)``).

Every module also takes ``backend="auto"`` as a keyword. A ``temperature`` (or uniformity's ``t``) may be
an ``nn.Parameter`` (or any one-element floating tensor): it is then learned, receiving its gradient
on every backend; a parameter passed to the constructor is registered as the module's own.
Tensor values are not range-checked (a device sync per step), so keep a learnable temperature
positive yourself, e.g. store its log and pass ``log_t.exp()`` to the functional loss.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from . import losses as F


def _distributed(gather_distributed: bool):
    """``fastcl.distributed`` when lightly's ``gather_distributed=True`` meets a multi-process group,
    else ``None`` (lightly likewise gathers only when ``torch.distributed`` runs more than one process)."""
    import torch.distributed as dist

    if gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from . import distributed

        return distributed
    return None


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss`` drop-in: ``forward(image_features, text_features, logit_scale, output_dict=False)``.

    ``logit_scale`` is the exponentiated scale, as open_clip passes it. With ``world_size > 1`` it
    runs over the process group ``group`` (default: the default group, which must have
    ``world_size`` ranks) with open_clip's semantics:

    - ``local_loss=True``: this rank's image and text rows against every rank's columns
      (``fastcl.distributed.clip_loss``; ``strategy="allgather"`` or ``"ring"`` when
      ``gather_with_grad=True``); each rank returns the mean over its own pairs.
    - ``local_loss=False``: the full global loss on every rank, as open_clip computes it (the fused
      loss on the gathered features: no ``N x N`` logits, but ``O(N_global * D)`` memory and every rank
      does the whole batch's work, as in open_clip).
    - ``gather_with_grad=False``: the other ranks' features are constants (only this rank's slice
      of the gathered features carries a gradient), exactly open_clip's gradient.

    ``cache_labels`` changes nothing (there are no label tensors to cache).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 group=None, strategy: str = "allgather"):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        if world_size > 1 and not gather_with_grad and strategy != "allgather":
            raise ValueError("ClipLoss(gather_with_grad=False) gathers features (open_clip's semantics): "
                             "strategy must be 'allgather'")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.group, self.strategy = group, strategy

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        if self.world_size == 1:
            loss = F.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        else:
            from .distributed import losses as D
            from .distributed.comm import Context

            _check_world(self, "ClipLoss")
            ctx = Context(self.group, self.strategy, gather_grad=self.gather_with_grad)
            if self.local_loss:
                loss = D._clip(image_features, text_features, logit_scale, ("image_features", "text_features",
                               "logit_scale"), None, True, 0.0, None, "mean", False, self.backend, self.group,
                               self.strategy, ctx=ctx)
            else:
                loss = F.clip_loss(ctx.gather(image_features), ctx.gather(text_features), logit_scale,
                                   backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


def _check_world(module, name: str) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}(world_size={module.world_size}) needs torch.distributed.init_process_group first")
    size, rank = dist.get_world_size(module.group), dist.get_rank(module.group)
    if size != module.world_size or rank != module.rank:
        raise ValueError(f"{name}(rank={module.rank}, world_size={module.world_size}) but the process group has "
                         f"rank {rank} of {size}")


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss`` drop-in:
    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``.

    With ``world_size > 1``: this rank's images against every rank's texts, positives only in its
    own block (open_clip's and big_vision's distributed SigLIP; the value is the mean over this
    rank's rows, as open_clip's). ``strategy="ring"`` (default: the texts travel the ring, as
    open_clip's ``dist_impl="bidir"/"shift"`` exchange neighbours) or ``"allgather"``; ``dist_impl``
    and ``bidir`` are accepted and change nothing (every implementation gives the same loss).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 bidir: bool = True, use_horovod: bool = False, *, backend: str = "auto", group=None,
                 strategy: str = "ring"):
        super().__init__()
        if use_horovod:
            raise ValueError("SigLipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.bidir, self.backend = dist_impl, bidir, backend
        self.group, self.strategy = group, strategy

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        if self.world_size == 1:
            loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        else:
            from . import distributed as D

            _check_world(self, "SigLipLoss")
            loss = D.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend,
                                 group=self.group, strategy=self.strategy)
        return {"contrastive_loss": loss} if output_dict else loss


class NTXentLoss(nn.Module):
    """lightly ``NTXentLoss`` drop-in: ``forward(out0, out1)``, features normalised inside."""

    def __init__(self, temperature: float | Tensor = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        if memory_bank_size:
            raise ValueError(
                "NTXentLoss(memory_bank_size>0) is not supported: keep your own queue and call "
                "fastcl.infonce_loss(out0, out1, temperature, extra_negatives=queue, normalize=True)")
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend

    def forward(self, out0, out1):
        fn = (_distributed(self.gather_distributed) or F).ntxent_loss
        return fn([out0, out1], self.temperature, normalize=True, backend=self.backend)


class DCLLoss(nn.Module):
    """lightly ``DCLLoss`` drop-in: ``forward(out0, out1)``; ``weight_fn(out0, out1) -> [B]`` optional."""

    def __init__(self, temperature: float | Tensor = 0.1, weight_fn: Callable | None = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.weight_fn, self.backend = temperature, weight_fn, backend
        self.gather_distributed = gather_distributed

    def forward(self, out0, out1):
        loss = (_distributed(self.gather_distributed) or F).dcl_loss
        return loss(out0, out1, self.temperature, weighting=self.weight_fn, normalize=True,
                    backend=self.backend)


class DCLWLoss(nn.Module):
    """lightly ``DCLWLoss`` drop-in: DCL with the negative von Mises-Fisher weights."""

    def __init__(self, temperature: float | Tensor = 0.1, sigma: float = 0.5, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.sigma, self.backend = temperature, sigma, backend
        self.gather_distributed = gather_distributed

    def forward(self, out0, out1):
        loss = (_distributed(self.gather_distributed) or F).dcl_loss
        return loss(out0, out1, self.temperature, weighting="vmf", sigma=self.sigma, normalize=True,
                    backend=self.backend)


class SupConLoss(nn.Module):
    """pytorch-metric-learning ``SupConLoss`` drop-in: ``forward(embeddings, labels)``, normalised inside."""

    def __init__(self, temperature: float | Tensor = 0.1, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels):
        return F.supcon_loss(embeddings, labels, self.temperature, normalize=True, backend=self.backend)


class _Functional(nn.Module):
    """A module that stores keyword hyper-parameters and forwards to one functional loss.

    An ``nn.Parameter`` among them (a learnable ``temperature`` or ``t``) is registered as the
    module's parameter, so ``module.parameters()``, ``.to()`` and ``state_dict()`` see it.
    """

    _fn: Callable

    def __init__(self, **hparams):
        super().__init__()
        self.hparams = {k: v for k, v in hparams.items() if not isinstance(v, nn.Parameter)}
        for name, value in hparams.items():
            if isinstance(value, nn.Parameter):
                self.register_parameter(name, value)

    def forward(self, *args, **kwargs):
        return self._fn(*args, **{**self.hparams, **dict(self.named_parameters(recurse=False)), **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class InfoNCELoss(_Functional):
    """``infonce_loss`` as a module: ``InfoNCELoss(temperature=0.07)(query, key)``."""
    _fn = staticmethod(F.infonce_loss)


class MVInfoNCELoss(_Functional):
    """``mv_infonce_loss`` as a module: ``MVInfoNCELoss(temperature=0.1)(views)``."""
    _fn = staticmethod(F.mv_infonce_loss)


class MVDHELLoss(_Functional):
    """``mv_dhel_loss`` as a module: ``MVDHELLoss(temperature=0.1)(views)``."""
    _fn = staticmethod(F.mv_dhel_loss)


class CWCLLoss(_Functional):
    """``cwcl_loss`` as a module: ``CWCLLoss()(x, y, logit_scale, weight_features)``."""
    _fn = staticmethod(F.cwcl_loss)


class MWLoss(_Functional):
    """``mw_loss`` as a module: ``MWLoss(temperature=0.05)(query, key)``."""
    _fn = staticmethod(F.mw_loss)


class UniformityLoss(_Functional):
    """``uniformity_loss`` as a module: ``UniformityLoss(t=2.0)(z)``."""
    _fn = staticmethod(F.uniformity_loss)


class AlignmentLoss(_Functional):
    """``alignment_loss`` as a module: ``AlignmentLoss(alpha=2.0)(x, y)``."""
    _fn = staticmethod(F.alignment_loss)


__all__ = [
    "AlignmentLoss", "CWCLLoss", "ClipLoss", "DCLLoss", "DCLWLoss", "InfoNCELoss", "MVDHELLoss",
    "MVInfoNCELoss", "MWLoss", "NTXentLoss", "SigLipLoss", "SupConLoss", "UniformityLoss",
]
