"""One module per loss family: each holds the public function (math in the docstring), its
reference on the materialised similarity matrix, and its composition of the engine primitives."""
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
