"""fastcl over a process group: every loss on the global batch of all ranks (``torch.distributed``).

    import fastcl.distributed as fcd
    loss = fcd.clip_loss(image_features, text_features, logit_scale.exp(), strategy="ring")

Same functions and arguments as ``fastcl.functional`` (made from their signatures and defaults,
``losses.py``) plus ``group=None`` (the default process group), ``strategy`` and ``node_size``; each
calls the very composition the single-process loss does (``fastcl.losses``), in the group's world
(``world.py``) with its plan (``plan.py``, ``ring.py``) instead of the local one:

- ``"allgather"``: gather every rank's columns, then the engine on local rows x global columns;
  backward reduce-scatters the column gradients. Memory ``O(N_global * D)``.
- ``"ring"``: column blocks travel the ring (``batch_isend_irecv``, overlapped with the
  computation on the block at hand), statistics merged as blocks arrive; in backward the blocks
  travel again with their gradient accumulators, which return to their owner (Inf-CL's scheme).
  CLIP's and CWCL's two directions are one turn over ``y`` (each block of S computed once, its
  column statistics travelling home with it). Memory ``O(N_local * D)`` per rank.
- ``"hierarchical"``: all-gather inside a node (``node_size`` ranks, default ``LOCAL_WORLD_SIZE``,
  consecutive in rank order), ring across nodes: memory ``O(node_size * N_local * D)``, cross-node
  traffic the ring's (one block per node in flight).

All ranks pass the same shapes and dtypes (checked in one small all-gather per call: a mismatch,
or any rank's invalid input, raises the same error on every rank); ``losses.py`` says what each
rank gets back. ``backend="reference"`` has no distributed path.
"""
from .losses import *  # noqa: F403 -- every loss, as fastcl.functional has them
from .losses import __all__ as _losses
from .world import DistributedInputError

__all__ = ["DistributedInputError", *_losses]
