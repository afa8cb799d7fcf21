"""fastcl inside the tools trainers already use, each in a module of its own, imported on demand (each
imports its library, which fastcl does not depend on, except where its math is restated):

- ``fastcl.integrations.sentence_transformers``: sentence-transformers' contrastive losses (MNRL and
  its cached, GIST and Matryoshka variants).
- ``fastcl.integrations.pylate``, ``fastcl.integrations.colpali``: late-interaction (MaxSim) losses,
  PyLate's ``Contrastive``/``CachedContrastive`` and colpali-engine's ``Colbert*Loss``.
- ``fastcl.integrations.open_clip``: ``install()`` makes open_clip_train build fastcl's losses.
"""
