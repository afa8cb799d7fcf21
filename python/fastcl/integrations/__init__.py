"""fastcl inside the tools trainers already use, each in a module of its own, imported on demand (each
imports its library, which fastcl does not depend on, except where its math is restated):

- ``fastcl.integrations.sentence_transformers``: sentence-transformers' contrastive losses (MNRL and
  its cached, GIST and Matryoshka variants). Extra: ``fastcl[sentence-transformers]`` (``fastcl[train]``
  adds what ``SentenceTransformerTrainer`` needs).
- ``fastcl.integrations.pylate``, ``fastcl.integrations.colpali``: late-interaction (MaxSim) losses,
  PyLate's ``Contrastive``/``CachedContrastive`` and colpali-engine's ``Colbert*Loss``. They restate
  those libraries' math and import nothing of theirs: no extra.
- ``fastcl.integrations.open_clip``: ``install()`` makes open_clip_train build fastcl's losses. Extra:
  ``fastcl[open-clip]``.

An integration whose library is missing raises an ``ImportError`` naming the extra that installs it
(``missing``). ``EXTRAS`` is what pyproject.toml's ``[project.optional-dependencies]`` declares for them
(``tests/test_integration_extras.py`` holds the two equal).
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys

# extra -> requirements, as in pyproject.toml; the floors are those requirements/dev.txt tests against
EXTRAS = {
    "sentence-transformers": ["sentence-transformers>=6.3,<7"],
    "train": ["sentence-transformers>=6.3,<7", "datasets>=2.16", "accelerate>=1.3"],
    "open-clip": ["open_clip_torch[training]>=3"],
}


def _installed(package: str) -> bool:
    if package in sys.modules:
        return sys.modules[package] is not None  # None: an import that is blocked (tests simulate a missing one so)
    return importlib.util.find_spec(package) is not None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def missing(what: str, package: str, extra: str, err: ImportError) -> ImportError:
    """The ``ImportError`` ``what`` (an integration) raises when importing ``package`` (its library's
    top-level module) failed with ``err``: the library not installed, or installed but not importable as
    the integration needs it (another version, a broken dependency); either way the extra to install.
    ``err`` itself when the failing import is fastcl's own (a bug here, not a missing library)."""
    if (err.name or "").split(".")[0] == "fastcl":
        return err
    requirement = EXTRAS[extra][0]
    install = (f'pip install --no-build-isolation "fastcl[{extra}]" (from a fastcl checkout: '
               f'pip install --no-build-isolation ".[{extra}]")')
    if not _installed(package):
        return ImportError(f"{what} needs {requirement}, which is not installed: {install}", name=package)
    distribution = re.match(r"[\w.-]+", requirement).group(0)  # the name before any extra or version
    return ImportError(f"{what} needs {requirement}; importing it failed ({err}; installed: {distribution} "
                       f"{_version(distribution)}): {install} installs a version it works with", name=err.name)
