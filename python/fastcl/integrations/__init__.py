"""fastcl inside the tools trainers already use, each in a module of its own, imported on demand (each
imports its library, which fastcl does not depend on):

- ``fastcl.integrations.sentence_transformers``: sentence-transformers' contrastive losses (MNRL and
  its cached, GIST and Matryoshka variants).
- planned (issue 25): ``fastcl.integrations.pylate``, ``fastcl.integrations.colpali`` (late-interaction,
  MaxSim, losses) and ``fastcl.integrations.open_clip`` (open_clip_train on fastcl's losses).
"""
