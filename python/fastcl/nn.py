"""``torch.nn.Module`` wrappers, one per loss, holding the hyper-parameters.

Where a well-known implementation exists, the module is a drop-in for it: same constructor, same
``forward`` signature, same defaults and the same normalisation habit:

- ``ClipLoss``, ``SigLipLoss``: open_clip (features used as given; the model normalises).
- ``NTXentLoss`` (memory bank included), ``DCLLoss``, ``DCLWLoss``: lightly (normalise inside).
- ``SupConLoss``: pytorch-metric-learning (normalises inside; ``forward(embeddings, labels,
  indices_tuple=None, ref_emb=None, ref_labels=None)``); with pml's ``NTXentLoss`` it lives in
  ``fastcl.metric_learning`` (lightly's ``NTXentLoss`` has the name here).

A peer feature a drop-in does not implement raises ``UnsupportedFeatureError`` (a
``NotImplementedError``) naming it; the README lists them per drop-in, with the reason.

Every module also takes ``backend="auto"`` as a keyword. A ``temperature`` (or uniformity's ``t``) may be
an ``nn.Parameter`` (or any one-element floating tensor): it is then learned, receiving its gradient
on every backend; a parameter passed to the constructor is registered as the module's own.
Tensor values are not range-checked (a device sync per step), so keep a learnable temperature
positive yourself, e.g. store its log and pass ``log_t.exp()`` to the functional loss.

Under ``torch.autocast`` a drop-in returns the dtype its peer's loss has there (the functional
losses return the features' dtype: SPEC). Which ops autocast lists as float32 differs per device
type, so each drop-in states its peer's result on CPU and CUDA (``AUTOCAST_RESULT``); float64
features, other device types and code outside autocast get the features' dtype. fastcl's math runs
with autocast off for the device (it accumulates in float32 anyway; a peer's ``x @ y.T`` runs in
the autocast dtype), and the loss is cast once from it. A peer whose result depends on its inputs'
dtype in a way no rule here says (float16 features under bfloat16 autocast make lightly's
``einsum`` raise) was not followed further.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import _checks as check
from . import losses as F
from ._autocast import as_peer_under_autocast
from ._checks import UnsupportedFeatureError
from .losses._common import maybe_normalize
from .losses.clip import queue_infonce_loss
from .losses.dcl import negative_mises_fisher_weights
from .losses.siglip import siglip_negatives_loss
from .metric_learning import SupConLoss


def _distributed(gather_distributed: bool):
    """``fastcl.distributed`` when lightly's ``gather_distributed=True`` meets a multi-process group,
    else ``None`` (lightly likewise gathers only when ``torch.distributed`` runs more than one process)."""
    import torch.distributed as dist

    if gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from . import distributed

        return distributed
    return None


class ClipLoss(nn.Module):
    """open_clip ``ClipLoss`` drop-in:
    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``.

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

    ``cache_labels`` changes nothing (there are no label tensors to cache). ``logit_bias`` (open_clip
    adds it to every logit) is accepted and changes nothing either: a constant added to a whole
    row or column cancels in its softmax, so neither the loss nor any gradient depends on it.

    dtype: the features' dtype; under ``torch.autocast`` (CPU, CUDA) float32, as open_clip's
    ``F.cross_entropy`` returns (float64 features: float64). Gradients have the features' dtype.
    """

    AUTOCAST_RESULT = {"cpu": "float32", "cuda": "float32"}

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: str = "auto",
                 group=None, strategy: str = "allgather"):
        super().__init__()
        if use_horovod:
            raise UnsupportedFeatureError("ClipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        if world_size > 1 and not gather_with_grad and strategy != "allgather":
            raise ValueError("ClipLoss(gather_with_grad=False) gathers features (open_clip's semantics): "
                             "strategy must be 'allgather'")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.group, self.strategy = group, strategy

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        with as_peer_under_autocast(self, image_features):
            loss = self._contrastive(image_features, text_features, logit_scale)
        return {"contrastive_loss": loss} if output_dict else loss

    def _contrastive(self, image_features, text_features, logit_scale):
        if self.world_size == 1:
            loss = F.clip_loss(image_features, text_features, logit_scale, backend=self.backend)
        else:
            from .distributed.world import GroupWorld
            from .losses.clip import _clip

            _check_world(self, "ClipLoss")
            world = GroupWorld(self.group, self.strategy, gather_grad=self.gather_with_grad)
            if self.local_loss:  # open_clip's loss: no labels, both directions, no smoothing
                loss = _clip(world, image_features, text_features, logit_scale, labels=None, bidirectional=True,
                             label_smoothing=0.0, extra_negatives=None, reduction="mean", normalize=False,
                             backend=self.backend, names=("image_features", "text_features", "logit_scale"))
            else:
                loss = F.clip_loss(world.gather(image_features), world.gather(text_features), logit_scale,
                                   backend=self.backend)
        return loss


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

    ``logit_bias=None`` means no bias, as in open_clip. ``chunk_size`` (open_clip's memory knob for
    its chunked path) is accepted and changes nothing: fastcl never holds more than a tile anyway.
    ``_loss(image_features, text_features, logit_scale, logit_bias=None, negative_only=False)`` is
    open_clip's per-block loss (the sum over the block divided by the image rows), which its
    distributed forward and its tests call; ``negative_only`` blocks may have any number of texts.

    With ``world_size > 1``: this rank's images against every rank's texts, positives only in its
    own block (open_clip's and big_vision's distributed SigLIP; the value is the mean over this
    rank's rows, as open_clip's). ``strategy="ring"`` (default: the texts travel the ring, as
    open_clip's ``dist_impl="bidir"/"shift"`` exchange neighbours) or ``"allgather"``; ``dist_impl``
    and ``bidir`` are accepted and change nothing (every implementation gives the same loss).

    dtype: the features' dtype; under ``torch.autocast`` what open_clip's
    ``-F.logsigmoid(labels * logits).sum() / M`` returns: float32 on CUDA (``sum`` autocasts to
    float32 there), on CPU the autocast dtype promoted with the features' (its ``labels`` have the
    features' dtype, its logits the autocast one: bfloat16 features under bfloat16 autocast give
    bfloat16, float16 or float32 features float32).
    """

    AUTOCAST_RESULT = {"cpu": "promoted", "cuda": "float32"}

    DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip's

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 chunk_size: int = 0, bidir: bool = True, use_horovod: bool = False, *, backend: str = "auto",
                 group=None, strategy: str = "ring"):
        super().__init__()
        if use_horovod:
            raise UnsupportedFeatureError("SigLipLoss(use_horovod=True): fastcl runs on torch.distributed only")
        if dist_impl is not None and dist_impl not in self.DIST_IMPLS:
            raise ValueError(f"SigLipLoss(dist_impl={dist_impl!r}): open_clip knows {self.DIST_IMPLS}")
        if not _is_integer(chunk_size):
            raise TypeError(f"SigLipLoss(chunk_size={chunk_size!r}) must be an integer")
        if chunk_size < 0:
            raise ValueError(f"SigLipLoss(chunk_size={chunk_size}) must be >= 0 (0: open_clip's unchunked path)")
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.chunk_size, self.bidir, self.backend = dist_impl or "bidir", chunk_size, bidir, backend
        self.group, self.strategy = group, strategy

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        if negative_only:
            return siglip_negatives_loss(image_features, text_features, logit_scale, bias, backend=self.backend)
        return F.siglip_loss(image_features, text_features, logit_scale, bias, backend=self.backend)

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        with as_peer_under_autocast(self, image_features):
            if self.world_size == 1:
                loss = self._loss(image_features, text_features, logit_scale, logit_bias)
            else:
                from . import distributed as D

                _check_world(self, "SigLipLoss")
                loss = D.siglip_loss(image_features, text_features, logit_scale,
                                     0.0 if logit_bias is None else logit_bias, backend=self.backend, group=self.group,
                                     strategy=self.strategy)
        return {"contrastive_loss": loss} if output_dict else loss


def _lightly_distributed_check(owner: str, gather_distributed: bool) -> None:
    """lightly's constructors refuse ``gather_distributed=True`` where torch.distributed is missing."""
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError(f"{owner}(gather_distributed=True) but torch.distributed is not available: set "
                         "gather_distributed=False or install a torch with distributed support")


def _signed(temperature, like: Tensor):
    """A temperature as the functional losses take it. lightly divides by any temperature, so a
    negative one flips every logit; the functional losses refuse a non-positive number but take a
    tensor unchecked, so a negative number goes over as a tensor."""
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and temperature < 0:
        return torch.tensor(float(temperature), dtype=torch.float64, device=like.device)
    return temperature


class MemoryBank(nn.Module):
    """lightly's ``MemoryBankModule`` as its ``NTXentLoss`` uses it: a queue of past rows, the oldest
    overwritten first.

    ``size``: ``(K, D)`` allocates the bank now, filled with random unit rows (``torch.randn``,
    normalised: what lightly draws); ``K = 0`` (or ``(0, D)``) disables it. A bare ``K > 0`` raises
    lightly's ``ValueError``, as lightly does since its 1.6 (PR #2021, which removed the form that
    lightly 1.5 deprecated with a ``UserWarning``, learning ``D`` from the first batch; that broke
    distributed training). A one-element ``(K,)`` raises the same (lightly 1.6 accepts it and fails
    at the first batch). ``bank [K, D]`` (float32, following the module's ``.to()``) and
    ``bank_ptr`` are non-persistent buffers, as in lightly.

    ``forward(batch, update)`` returns a detached copy of the bank as it was before the call, then,
    if ``update``, writes the batch's rows (detached) at the pointer. A batch that reaches the end
    fills it and sends the pointer back to 0; its remaining rows are dropped, as lightly does. With
    ``gather_distributed`` and a multi-process group, every rank's batch is written, in rank order.
    """

    def __init__(self, size: int | Sequence[int] = 0, gather_distributed: bool = False):
        super().__init__()
        sizes = (size,) if _is_integer(size) else tuple(size) if isinstance(size, Sequence) else None
        if sizes is None or not all(_is_integer(k) for k in sizes):
            raise TypeError(f"memory_bank_size must be an integer K or a (K, D) pair of integers, got {size!r}")
        if not 1 <= len(sizes) <= 2 or any(k < 0 for k in sizes):
            raise ValueError(f"memory_bank_size={size!r}: give K >= 0 rows, or (K, D) with D >= 0")
        if len(sizes) == 1 and sizes[0] > 0:  # lightly 1.6's message (lightly/models/modules/memory_bank.py)
            raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                             f"'size=({sizes[0]}, dim)', or pass 'size=0' to disable the memory bank.")
        self.size, self.gather_distributed = tuple(int(k) for k in sizes), gather_distributed
        self.register_buffer("bank", torch.empty(self.size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(self.size) > 1:
            self._allocate(self.size)

    def forward(self, batch: Tensor, update: bool) -> Tensor | None:
        if self.size[0] == 0:
            return None
        if self.bank.shape[1:] != batch.shape[1:]:
            raise ValueError(f"the memory bank holds rows of width {self.bank.shape[1]} (memory_bank_size="
                             f"{tuple(self.bank.shape)}) but the features have D={batch.shape[1]}")
        bank = self.bank.clone().detach()
        if update:
            self._enqueue(batch)
        return bank

    @torch.no_grad()
    def _allocate(self, size: tuple[int, ...]) -> None:
        self.bank = nn.functional.normalize(torch.randn(size).type_as(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        dist = torch.distributed
        if self.gather_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [torch.empty_like(batch) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        k, n, ptr = self.size[0], batch.shape[0], int(self.bank_ptr)
        if ptr + n >= k:
            self.bank[ptr:] = batch[:k - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr:ptr + n] = batch.detach()
            self.bank_ptr[0] = ptr + n


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class NTXentLoss(nn.Module):
    """lightly ``NTXentLoss`` drop-in: ``forward(out0, out1)``, features normalised inside.

    ``memory_bank_size=(K, D)`` (see ``MemoryBank``; ``0`` disables it) turns it into lightly's MoCo
    loss: each ``out0`` row against its ``out1`` row and the bank's rows only
    (``losses.clip.queue_infonce_loss``), after which the normalised ``out1`` rows are enqueued,
    when ``out0`` requires grad (lightly's rule: evaluating under ``no_grad`` leaves the bank as it
    is). ``temperature``: anything lightly takes, ``|t| >= 1e-8`` (a negative one flips the logits).

    dtype: the features' dtype; under ``torch.autocast`` (CPU, CUDA) float32, as lightly's
    ``nn.CrossEntropyLoss`` returns (float64 features: float64).
    """

    AUTOCAST_RESULT = {"cpu": "float32", "cuda": "float32"}

    def __init__(self, temperature: float | Tensor = 0.5, memory_bank_size: int | Sequence[int] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        check.peer_temperature("NTXentLoss", temperature)
        self.memory_bank = MemoryBank(memory_bank_size, gather_distributed=gather_distributed)
        self.temperature, self.gather_distributed, self.backend = temperature, gather_distributed, backend
        _lightly_distributed_check("NTXentLoss", gather_distributed)

    def forward(self, out0, out1):
        with as_peer_under_autocast(self, out0):
            return self._ntxent(out0, out1)

    def _ntxent(self, out0, out1):
        temperature = _signed(self.temperature, out0)
        if self.memory_bank.size[0] == 0:
            fn = (_distributed(self.gather_distributed) or F).ntxent_loss
            return fn([out0, out1], temperature, normalize=True, backend=self.backend)
        # Checked before the bank changes; normalised here because the bank stores unit rows.
        check.features("out0", out0)
        check.features("out1", out1)
        check.same_kind(("out0", "out1"), (out0, out1))
        check.paired(("out0", "out1"), out0, out1)
        out0, out1 = maybe_normalize(out0, True), maybe_normalize(out1, True)
        queue = self.memory_bank(out1, update=out0.requires_grad)
        return queue_infonce_loss(out0, out1, queue.to(out0), temperature, backend=self.backend)


class DCLLoss(nn.Module):
    """lightly ``DCLLoss`` drop-in: ``forward(out0, out1)``; ``weight_fn(out0, out1) -> [B]`` optional.

    dtype: the features' dtype; under ``torch.autocast`` (CPU, CUDA) the autocast dtype, as lightly's
    ``einsum``, ``logsumexp`` and ``mean`` leave it, whatever the features' (float64: float64). A
    ``weight_fn`` runs with autocast off (lightly calls it under autocast).
    """

    AUTOCAST_RESULT = {"cpu": "autocast", "cuda": "autocast"}

    def __init__(self, temperature: float | Tensor = 0.1, weight_fn: Callable | None = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.temperature, self.weight_fn, self.backend = temperature, weight_fn, backend
        self.gather_distributed = gather_distributed
        _lightly_distributed_check(type(self).__name__, gather_distributed)

    def forward(self, out0, out1):
        loss = (_distributed(self.gather_distributed) or F).dcl_loss
        with as_peer_under_autocast(self, out0):
            return loss(out0, out1, _signed(self.temperature, out0), normalize=True, backend=self.backend,
                        **self._weighting())

    def _weighting(self) -> dict:
        return {"weighting": self.weight_fn}


class DCLWLoss(DCLLoss):
    """lightly ``DCLWLoss`` drop-in: DCL with the negative von Mises-Fisher weights.

    dtype under ``torch.autocast``: on CPU the autocast dtype, as ``DCLLoss``; on CUDA float32 (its
    weights' ``softmax`` autocasts to float32 there, and the weighted positive term promotes the sum).
    """

    AUTOCAST_RESULT = {"cpu": "autocast", "cuda": "float32"}

    def __init__(self, temperature: float | Tensor = 0.1, sigma: float = 0.5, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__(temperature, weight_fn="vmf", gather_distributed=gather_distributed, backend=backend)
        self.sigma = sigma

    def _weighting(self) -> dict:
        # "vmf" rather than lightly's partial(negative_mises_fisher_weights, sigma): the same weights,
        # in the math dtype, and fastcl.distributed takes their softmax over the global batch.
        return {"weighting": "vmf", "sigma": self.sigma}


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


class MaxSimLoss(_Functional):
    """``maxsim_loss`` (late interaction) as a module: ``MaxSimLoss(temperature=0.02)(q, d, q_mask=m, d_mask=n)``."""
    _fn = staticmethod(F.maxsim_loss)


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
    "AlignmentLoss", "CWCLLoss", "ClipLoss", "DCLLoss", "DCLWLoss", "InfoNCELoss", "MaxSimLoss", "MVDHELLoss",
    "MVInfoNCELoss", "MWLoss", "MemoryBank", "NTXentLoss", "SigLipLoss", "SupConLoss", "UniformityLoss",
    "UnsupportedFeatureError", "negative_mises_fisher_weights",
]
