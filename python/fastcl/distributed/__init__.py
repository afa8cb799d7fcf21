"""fastcl over a process group: every loss on the global batch of all ranks (``torch.distributed``).

    import fastcl.distributed as fcd
    loss = fcd.clip_loss(image_features, text_features, logit_scale.exp(), strategy="ring")

Same functions and arguments as ``fastcl.functional`` plus ``group=None`` (the default process
group) and ``strategy``:

- ``"allgather"``: gather the features with gradient (backward reduce-scatters the feature
  gradients), then the fused engine on local rows x global columns. Memory ``O(N_global * D)``.
- ``"ring"``: feature blocks travel the ring (``batch_isend_irecv``, overlapped with the
  computation on the block at hand), statistics merged as blocks arrive; in backward the blocks
  travel again with their gradient accumulators, which return to their owner (Inf-CL's scheme).
  Memory ``O(N_local * D)`` per rank.

Each rank passes its local rows (``[V, B_local, D]`` for multi-view losses: a sample's views stay
on one rank); all ranks must pass the same shapes and dtypes (checked in one small all-gather per
call: a mismatch, or any rank's invalid input, raises the same error on every rank). The mean over
ranks of the returned losses equals the single-process loss on the concatenation of all ranks'
inputs in rank order, and after DDP averages the gradients they equal the single-process ones
(see ``losses.py`` for each reduction, ``uniformity_loss`` for the one loss that is not a mean of
per-anchor terms). ``backend`` picks the engine (``"auto"``, ``"cpu"``, ``"chunked"``, ...);
``"reference"`` has no distributed path.
"""
from .comm import DistributedInputError
from .losses import (
    alignment_loss,
    clip_loss,
    cwcl_loss,
    dcl_loss,
    infonce_loss,
    mv_dhel_loss,
    mv_infonce_loss,
    mw_loss,
    ntxent_loss,
    siglip_loss,
    supcon_loss,
    uniformity_loss,
)

__all__ = [
    "DistributedInputError", "alignment_loss", "clip_loss", "cwcl_loss", "dcl_loss", "infonce_loss",
    "mv_dhel_loss", "mv_infonce_loss", "mw_loss", "ntxent_loss", "siglip_loss", "supcon_loss", "uniformity_loss",
]
