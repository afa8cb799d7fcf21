"""The compiled extension, loaded once. The package still works without it (pure-PyTorch
backends); ``fastcl.info()`` and the ``cpu`` backend's reasons say why it is missing."""
import torch  # noqa: F401  (libtorch must be loaded before the extension)

try:
    from . import _C
except ImportError as err:
    _C, ERROR = None, f"{type(err).__name__}: {err}"
else:
    ERROR = None
