"""Every loss of fastcl over the global batch of a process group: the single-process composition
(``fastcl.losses``) run in the group's world instead of the world of one.

Rank ``r`` of ``W`` passes its local rows; the global batch is the concatenation of all ranks'
inputs in rank order (multi-view ``[V, B, D]``: along ``B``). Each loss's composition says what its
arguments mean over a group (``labels`` are global indices, ...). Reductions, chosen so that the
mean over ranks of the returned values equals the single-process loss and, once DDP averages the
gradients, the gradients equal the single-process ones:
- ``mean``: the mean over this rank's anchors of their global-batch terms (SupCon: ``W`` times the
  sum of this rank's terms over the global count of anchors with a positive; uniformity: the
  global value on every rank);
- ``sum``: ``W`` times the sum of this rank's terms (so the mean over ranks is the global sum);
- ``none``: this rank's rows of the single-process output (NT-Xent: ``[V * B_local]`` view-major
  over the local samples); these concatenate to the global output, gradients are not rescaled.
Feature gradients on each rank are therefore ``W`` times the single-process ones under
``mean``/``sum`` (DDP divides by ``W``); gradients of replicated scalars (``logit_scale``,
``logit_bias``, a tensor ``temperature`` or uniformity's ``t``) average over ranks to the
single-process ones, which is what DDP does with a parameter's gradients (``none``: they sum).
"""
from __future__ import annotations

from ..losses import clip, cwcl, dcl, geometry, maxsim, multiview, mw, ntxent, siglip
from .world import GroupWorld


def _world(group, strategy, node_size):
    return GroupWorld(group, strategy, node_size=node_size)


def clip_loss(x, y, logit_scale, *, labels=None, bidirectional=True, label_smoothing=0.0, extra_negatives=None,
              reduction="mean", normalize=False, backend="auto", group=None, strategy="allgather", node_size=None):
    return clip._clip(_world(group, strategy, node_size), x, y, logit_scale, ("x", "y", "logit_scale"), labels,
                      bidirectional, label_smoothing, extra_negatives, reduction, normalize, backend)


def infonce_loss(query, key, temperature=0.07, *, labels=None, extra_negatives=None, reduction="mean",
                 normalize=False, backend="auto", group=None, strategy="allgather", node_size=None):
    return clip._clip(_world(group, strategy, node_size), query, key, temperature, ("query", "key", "temperature"),
                      labels, False, 0.0, extra_negatives, reduction, normalize, backend)


def siglip_loss(x, y, logit_scale, logit_bias, *, reduction="mean", normalize=False, backend="auto", group=None,
                strategy="allgather", node_size=None):
    return siglip._siglip(_world(group, strategy, node_size), x, y, logit_scale, logit_bias, reduction, normalize,
                          backend)


def ntxent_loss(views, temperature=0.5, *, reduction="mean", normalize=False, backend="auto", group=None,
                strategy="allgather", node_size=None):
    return ntxent._ntxent(_world(group, strategy, node_size), views, temperature, reduction, normalize, backend)


def supcon_loss(features, labels, temperature=0.1, *, reduction="mean", normalize=False, backend="auto",
                group=None, strategy="allgather", node_size=None):
    return ntxent._supcon(_world(group, strategy, node_size), features, labels, temperature, reduction, normalize,
                          backend)


def dcl_loss(view0, view1, temperature=0.1, *, weighting=None, sigma=0.5, reduction="mean", normalize=False,
             backend="auto", group=None, strategy="allgather", node_size=None):
    return dcl._dcl(_world(group, strategy, node_size), view0, view1, temperature, weighting, sigma, reduction,
                    normalize, backend)


def mv_infonce_loss(views, temperature=0.1, *, reduction="mean", normalize=False, backend="auto", group=None,
                    strategy="allgather", node_size=None):
    return multiview._multiview(_world(group, strategy, node_size), views, temperature, reduction, normalize,
                                backend, dhel=False)


def mv_dhel_loss(views, temperature=0.1, *, reduction="mean", normalize=False, backend="auto", group=None,
                 strategy="allgather", node_size=None):
    return multiview._multiview(_world(group, strategy, node_size), views, temperature, reduction, normalize,
                                backend, dhel=True)


def cwcl_loss(x, y, logit_scale, weight_features, *, bidirectional=True, reduction="mean", normalize=False,
              backend="auto", group=None, strategy="allgather", node_size=None):
    return cwcl._cwcl(_world(group, strategy, node_size), x, y, logit_scale, weight_features, bidirectional,
                      reduction, normalize, backend)


def mw_loss(query, key, temperature=0.05, *, labels=None, reduction="mean", normalize=False, backend="auto",
            group=None, strategy="allgather", node_size=None):
    return mw._mw(_world(group, strategy, node_size), query, key, temperature, labels, reduction, normalize,
                  backend)


def uniformity_loss(z, t=2.0, *, reduction="mean", normalize=False, backend="auto", group=None,
                    strategy="allgather", node_size=None):
    return geometry._uniformity(_world(group, strategy, node_size), z, t, reduction, normalize, backend)


def alignment_loss(x, y, alpha=2.0, *, reduction="mean", normalize=False, backend="auto", group=None,
                   strategy="allgather", node_size=None):
    return geometry._alignment(_world(group, strategy, node_size), x, y, alpha, reduction, normalize, backend)


def maxsim_loss(q, d, temperature=0.02, *, q_mask=None, d_mask=None, labels=None, extra_docs=None,
                extra_docs_mask=None, normalize_scores=False, symmetric=False, reduction="mean", normalize=False,
                backend="auto", group=None, strategy="allgather", node_size=None):
    return maxsim._maxsim(_world(group, strategy, node_size), q, d, temperature, q_mask, d_mask, labels, extra_docs,
                          extra_docs_mask, normalize_scores, symmetric, reduction, normalize, backend)


__all__ = ["alignment_loss", "clip_loss", "cwcl_loss", "dcl_loss", "infonce_loss", "maxsim_loss", "mv_dhel_loss",
           "mv_infonce_loss", "mw_loss", "ntxent_loss", "siglip_loss", "supcon_loss", "uniformity_loss"]
for _name in __all__:
    globals()[_name].__doc__ = (f"``fastcl.{_name}`` over the global batch of the process group ``group`` (default: "
                                "the default group); ``strategy`` and ``node_size``: see ``fastcl.distributed``.")
