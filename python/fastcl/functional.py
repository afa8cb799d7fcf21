"""The functional API: every loss of fastcl as a plain function (also exported from ``fastcl``)."""
from .losses import *  # noqa: F401,F403
from .losses import __all__  # noqa: F401
