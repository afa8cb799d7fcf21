"""One module per loss family: each holds the public function (math in the docstring), its
reference on the materialised similarity matrix, and its composition of the engine primitives.

The public function is the loss in one process: ``clip_loss(x, y, s, ...)`` is
``clip._clip(LOCAL, x, y, s, ...)``, the composition in the world of one. ``COMPOSITIONS`` names each
loss's composition, which takes a world (``_plan.py``) and then the loss's own arguments, positional
ones in order and keyword ones by name, with no defaults of its own: the signature of the public
function holds them. ``fastcl.distributed`` makes its entry points from the two.
"""
from . import clip, cwcl, dcl, geometry, maxsim, multiview, mw, ntxent, siglip
from .clip import clip_loss, infonce_loss
from .cwcl import cwcl_loss
from .dcl import dcl_loss
from .geometry import alignment_loss, uniformity_loss
from .maxsim import maxsim_loss
from .multiview import mv_dhel_loss, mv_infonce_loss
from .mw import mw_loss
from .ntxent import ntxent_loss, supcon_loss
from .siglip import siglip_loss

__all__ = [
    "alignment_loss", "clip_loss", "cwcl_loss", "dcl_loss", "infonce_loss", "maxsim_loss", "mv_dhel_loss",
    "mv_infonce_loss", "mw_loss", "ntxent_loss", "siglip_loss", "supcon_loss", "uniformity_loss",
]

COMPOSITIONS = {
    "alignment_loss": geometry._alignment, "clip_loss": clip._clip, "cwcl_loss": cwcl._cwcl, "dcl_loss": dcl._dcl,
    "infonce_loss": clip._infonce, "maxsim_loss": maxsim._maxsim, "mv_dhel_loss": multiview._mv_dhel,
    "mv_infonce_loss": multiview._mv_infonce, "mw_loss": mw._mw, "ntxent_loss": ntxent._ntxent,
    "siglip_loss": siglip._siglip, "supcon_loss": ntxent._supcon, "uniformity_loss": geometry._uniformity,
}
