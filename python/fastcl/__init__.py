"""fastcl: contrastive losses at large batch without the N x N similarity matrix.

    import fastcl
    loss = fastcl.clip_loss(image_features, text_features, logit_scale.exp())

Every loss takes ``backend="auto"`` or the name of a declared backend (``reference``, ``chunked``,
``cpu``, ``triton``, ``cuda``: ``fastcl/backend/registry.py``); ``fastcl.backends(device)`` lists
those that can run here, ``fastcl.info()`` what was built and what each backend declares.
"""
import torch  # noqa: F401  (libtorch must be loaded before the extension)

from . import distributed, functional, nn
from ._info import __version__, backends, info
from .backend import BackendUnavailableError
from .cached import cached_backward, cached_loss
from .losses import (
    alignment_loss,
    clip_loss,
    cwcl_loss,
    dcl_loss,
    infonce_loss,
    maxsim_loss,
    mv_dhel_loss,
    mv_infonce_loss,
    mw_loss,
    ntxent_loss,
    siglip_loss,
    supcon_loss,
    uniformity_loss,
)
from .mining import TopK, mix_hard_negatives, topk

__all__ = [
    "BackendUnavailableError", "__version__", "alignment_loss", "backends", "clip_loss", "cwcl_loss",
    "dcl_loss", "distributed", "functional", "info", "infonce_loss", "mv_dhel_loss", "mv_infonce_loss", "mw_loss", "nn",
    "maxsim_loss", "ntxent_loss", "siglip_loss", "supcon_loss", "uniformity_loss",
    "TopK", "cached_backward", "cached_loss", "mix_hard_negatives", "topk",
]
