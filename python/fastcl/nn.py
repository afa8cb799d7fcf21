"""``torch.nn.Module`` wrappers, one per loss, holding the hyper-parameters.

Where a well-known implementation exists, the module is a drop-in for it: same constructor, same
``forward`` signature, same defaults and the same normalisation habit:

- ``ClipLoss``, ``SigLipLoss``: open_clip (features used as given; the model normalises).
- ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``: lightly (normalise inside).
- ``SupConLoss``: pytorch-metric-learning (normalises inside; ``forward(embeddings, labels)``).

Every module also takes ``backend="auto"`` as a keyword.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import losses as F


def _single_process(name: str, world_size: int, extra: str = "") -> None:
    if world_size != 1:
        raise NotImplementedError(
            f"{name}(world_size={world_size}): multi-process losses need fastcl.distributed, which is not "
            f"part of this version yet{extra}; gather the features yourself and call the single-process loss"
        )


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss`` drop-in: ``forward(image_features, text_features, logit_scale, output_dict=False)``.

    ``logit_scale`` is the exponentiated scale, as open_clip passes it. Single process here
    (``world_size=1``); ``local_loss``, ``gather_with_grad``, ``cache_labels`` and ``use_horovod``
    are accepted for compatibility and change nothing in a single process.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        _single_process("ClipLoss", world_size)
        if use_horovod:
            raise ValueError("ClipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        loss = F.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """open_clip ``SigLipLoss`` drop-in:
    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False)``."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 bidir: bool = True, use_horovod: bool = False, *, backend: str = "auto"):
        super().__init__()
        _single_process("SigLipLoss", world_size)
        if use_horovod:
            raise ValueError("SigLipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.bidir, self.backend = dist_impl, bidir, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        loss = F.siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class NTXentLoss(nn.Module):
    """lightly ``NTXentLoss`` drop-in: ``forward(out0, out1)``, features normalised inside."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: int = 0, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        if memory_bank_size:
            raise ValueError(
                "NTXentLoss(memory_bank_size>0) is not supported: keep your own queue and call "
                "fastcl.infonce_loss(out0, out1, temperature, extra_negatives=queue, normalize=True)")
        if gather_distributed:
            _single_process("NTXentLoss(gather_distributed=True)", 2)
        self.temperature, self.backend = temperature, backend

    def forward(self, out0, out1):
        return F.ntxent_loss([out0, out1], self.temperature, normalize=True, backend=self.backend)


class DCLLoss(nn.Module):
    """lightly ``DCLLoss`` drop-in: ``forward(out0, out1)``; ``weight_fn(out0, out1) -> [B]`` optional."""

    def __init__(self, temperature: float = 0.1, weight_fn: Callable | None = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if gather_distributed:
            _single_process("DCLLoss(gather_distributed=True)", 2)
        self.temperature, self.weight_fn, self.backend = temperature, weight_fn, backend

    def forward(self, out0, out1):
        return F.dcl_loss(out0, out1, self.temperature, weighting=self.weight_fn, normalize=True,
                          backend=self.backend)


class DCLWLoss(nn.Module):
    """lightly ``DCLWLoss`` drop-in: DCL with the negative von Mises-Fisher weights."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__()
        if gather_distributed:
            _single_process("DCLWLoss(gather_distributed=True)", 2)
        self.temperature, self.sigma, self.backend = temperature, sigma, backend

    def forward(self, out0, out1):
        return F.dcl_loss(out0, out1, self.temperature, weighting="vmf", sigma=self.sigma, normalize=True,
                          backend=self.backend)


class SupConLoss(nn.Module):
    """pytorch-metric-learning ``SupConLoss`` drop-in: ``forward(embeddings, labels)``, normalised inside."""

    def __init__(self, temperature: float = 0.1, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.backend = temperature, backend

    def forward(self, embeddings, labels):
        return F.supcon_loss(embeddings, labels, self.temperature, normalize=True, backend=self.backend)


class _Functional(nn.Module):
    """A module that stores keyword hyper-parameters and forwards to one functional loss."""

    _fn: Callable

    def __init__(self, **hparams):
        super().__init__()
        self.hparams = hparams

    def forward(self, *args, **kwargs):
        return self._fn(*args, **{**self.hparams, **kwargs})

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
