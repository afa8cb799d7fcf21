"""open_clip_train on fastcl's losses: ``fastcl.integrations.open_clip.install()`` before its ``main``.

    import fastcl.integrations.open_clip
    fastcl.integrations.open_clip.install()          # then open_clip_train.main.main(argv) as usual

open_clip_train builds its loss from names bound at import, so patching ``open_clip.loss`` alone
does nothing for a release: open_clip 3.x's ``main`` calls ``open_clip.create_loss(args)``
(``src/open_clip/factory.py``), which reads ``ClipLoss`` and ``SigLipLoss`` from ``open_clip.factory``'s
own namespace (``from .loss import ...`` at its import). open_clip's main branch (after 3.3.0)
builds a task instead (``create_task``), whose ``CLIPTask``/``SigLIPTask`` import them from
``open_clip.loss`` when constructed. ``install`` replaces both bindings, and ``open_clip.ClipLoss``
(the package's export), with fastcl's drop-ins taking open_clip's constructor arguments:

- ``ClipLoss``: ``fastcl.nn.ClipLoss``; across ranks with ``local_loss`` and ``gather_with_grad``
  (open_clip_train's ``--local-loss --gather-with-grad``) the ring exchange (``strategy="ring"``:
  one neighbour's block in flight, not the gathered batch), otherwise the all-gather open_clip's
  semantics need;
- ``SigLipLoss``: ``fastcl.nn.SigLipLoss`` (the ring by default, ``dist_impl`` accepted).

Both return ``{"contrastive_loss": ...}`` with ``output_dict=True`` (what open_clip_train asks for)
and a float32 loss under autocast, as open_clip's (see ``fastcl.nn``). Distillation, CoCa, GenLIP
and CLAP keep open_clip's own losses. ``uninstall()`` puts open_clip's classes back.

``tests/test_open_clip_train.py`` runs open_clip_train's ``main`` (open_clip 3.3.0) stock and after
``install()`` and compares the logged losses and the trained weights; ``tests/test_integration_open_clip.py``
checks the bindings, the main branch's task path included, on a stand-in package.
"""
from __future__ import annotations

import importlib

from .. import nn as fnn
from . import missing

__all__ = ["ClipLoss", "SigLipLoss", "install", "installed", "uninstall"]

_OPTIONS = {"backend": "auto"}
# where each name is looked up: the factory's namespace (open_clip 3.x create_loss), the loss module
# (the main branch's tasks import from it when built), the package (its export)
_TARGETS = (("open_clip.factory", ("ClipLoss", "SigLipLoss")), ("open_clip.loss", ("ClipLoss", "SigLipLoss")),
            ("open_clip", ("ClipLoss", "SigLipLoss")))
_REPLACED: dict[tuple[str, str], object] = {}


class ClipLoss(fnn.ClipLoss):
    """``fastcl.nn.ClipLoss`` with open_clip's constructor; the ring when each rank's loss is local
    and its gradients travel, otherwise the all-gather."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        ring = local_loss and gather_with_grad and world_size > 1
        super().__init__(local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod,
                         backend=_OPTIONS["backend"], strategy="ring" if ring else "allgather")


class SigLipLoss(fnn.SigLipLoss):
    """``fastcl.nn.SigLipLoss`` with open_clip's constructor (the ring across ranks)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None,
                 chunk_size: int = 0, bidir: bool = True, use_horovod: bool = False):
        super().__init__(cache_labels, rank, world_size, dist_impl, chunk_size, bidir, use_horovod,
                         backend=_OPTIONS["backend"])


_OURS = {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss}


def install(*, backend: str = "auto") -> list[str]:
    """Make open_clip (and so open_clip_train) build fastcl's ``ClipLoss`` and ``SigLipLoss`` on
    ``backend``; returns the bindings replaced (``"open_clip.factory.ClipLoss"``, ...). Idempotent."""
    try:
        importlib.import_module("open_clip")
    except ImportError as err:
        raise missing("fastcl.integrations.open_clip.install()", "open_clip", "open-clip", err) from err
    _OPTIONS["backend"] = backend
    done = []
    for module_name, names in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            if not hasattr(module, name):
                continue
            _REPLACED.setdefault((module_name, name), getattr(module, name))
            setattr(module, name, _OURS[name])
            done.append(f"{module_name}.{name}")
    return done


def uninstall() -> None:
    """Put back what ``install`` replaced."""
    for (module_name, name), original in _REPLACED.items():
        setattr(importlib.import_module(module_name), name, original)
    _REPLACED.clear()
    _OPTIONS["backend"] = "auto"


def installed() -> bool:
    return bool(_REPLACED)
