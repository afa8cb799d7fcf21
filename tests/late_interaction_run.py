"""PyLate's and colpali-engine's own losses against fastcl's drop-ins, on the same tiny inputs.

    python tests/late_interaction_run.py RESULT.pt

tests/test_late_interaction_packages.py runs it in the environment tools/late_interaction_venv.sh
makes (PyLate 1.6.0 on sentence-transformers 5.3.0, colpali-engine 0.3.18 with torchvision and peft)
and compares what it saves: for every case, the original's loss and gradients (``"stock"``) and
fastcl's on each CPU backend (``"fastcl"``), plus the versions and files of what was imported.
torchvision's compiled ops are PyPI's CUDA build: their schemas are defined first where they do not
load, as tests/open_clip_train_run.py does (transformers imports torchvision when it is installed).

- colpali: ``ColbertLoss``, ``ColbertPairwiseCELoss``, ``ColbertSigmoidLoss``,
  ``ColbertNegativeCELoss``, ``ColbertPairwiseNegativeCELoss`` (what 0.3.18 exports), normalised or
  raw scores, with and without positive-aware filtering, offsets 0 and 2 (the sigmoid loss: 0 only,
  its positives are marked in a ``[B, B]`` view), on zero-padded token embeddings whose documents
  ``2, 3`` are near copies of ``0, 1`` (filtering then has negatives above its threshold); gradients
  with respect to the leaves the embeddings are built from. colpali's hard max runs its torch
  reference here (late-interaction-kernels is not installed and needs CUDA or MPS).
- PyLate: ``Contrastive`` and ``CachedContrastive`` (``mini_batch_size=2``) with the default
  ``ColBERTScores``, query mask or query expansion, mean or sum, positives only or with a negative
  column, on a tiny model built in code (what the losses use of a ColBERT: ``model(features)
  ["token_embeddings"]``, ``skiplist``, ``do_query_expansion``), queries and documents padded (the
  query mask matters); gradients of its parameters.
Every case in float64 (both originals run in it), a few in float32; and ``perturbed`` cases, the
original with its temperature 1% off, which the test requires to differ.
"""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from open_clip_train_run import torchvision_without_its_ops  # noqa: E402

D = 6
COLPALI = {"ColbertLoss": False, "ColbertPairwiseCELoss": False, "ColbertSigmoidLoss": False,
           "ColbertNegativeCELoss": True, "ColbertPairwiseNegativeCELoss": True}  # name: takes negatives
PYLATE = ("Contrastive", "CachedContrastive")


# --- colpali ----------------------------------------------------------------------------------------

def padded_tokens(rows, tokens, seed, dtype, *shape):
    g = torch.Generator().manual_seed(seed)
    leaf = torch.randn(*shape, rows, tokens, D, generator=g, dtype=torch.float64).to(dtype)
    lengths = torch.randint(2, tokens + 1, (*shape, rows), generator=g)
    return leaf, torch.arange(tokens) < lengths.unsqueeze(-1)


def colpali_inputs(c, dtype, b=4, lq=5, ld=7, negs=2, seed=0):
    (q, qm), (d, dm), (n, nm) = (padded_tokens(b, lq, seed, dtype), padded_tokens(c, ld, seed + 1, dtype),
                                 padded_tokens(negs, ld, seed + 2, dtype, b))

    def build(q, d, n):
        near = torch.cat([d[:2], d[:2] + 0.01 * d[2:4], d[4:]])
        return (F.normalize(q, dim=-1) * qm.unsqueeze(-1), F.normalize(near, dim=-1) * dm.unsqueeze(-1),
                F.normalize(n, dim=-1) * nm.unsqueeze(-1))

    return (q, d, n), build


def colpali_run(loss_fn, leaves, build, negatives, offset):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    q, d, n = build(*leaves)
    loss = loss_fn(*((q, d, n) if negatives else (q, d)), offset=offset)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
    return loss.detach(), list(grads)


def colpali_cases(stock, ours, backends):
    cases = {}
    for name, negatives in COLPALI.items():
        for normalize in (True, False):
            for filtering in (False, True):
                for offset in (0, 2):
                    if name == "ColbertSigmoidLoss" and offset:
                        continue
                    for dtype in (torch.float64, torch.float32):
                        if dtype == torch.float32 and (not normalize or filtering or offset):
                            continue
                        t = 0.5 if name == "ColbertPairwiseCELoss" else 0.05
                        kwargs = {"temperature": t, "normalize_scores": normalize,
                                  "pos_aware_negative_filtering": filtering}
                        if negatives:
                            kwargs["in_batch_term_weight"] = 0.3
                        leaves, build = colpali_inputs(4 if name == "ColbertSigmoidLoss" else 6, dtype)
                        key = (f"colpali {name} {'normalized' if normalize else 'raw'}"
                               f"{' filtered' if filtering else ''} offset{offset} {str(dtype)[6:]}")
                        case = {"stock": colpali_run(getattr(stock, name)(**kwargs), leaves, build, negatives, offset),
                                "fastcl": {b: colpali_run(getattr(ours, name)(**kwargs, backend=b), leaves, build,
                                                          negatives, offset) for b in backends}}
                        if normalize and not filtering and not offset and dtype == torch.float64:
                            off = {**kwargs, "temperature": t * 1.01}
                            case["perturbed"] = colpali_run(getattr(stock, name)(**off), leaves, build, negatives,
                                                            offset)
                        cases[key] = case
    return cases


# --- PyLate -----------------------------------------------------------------------------------------

class TinyColBERT(nn.Module):
    """What PyLate's losses use of a ColBERT: ``model(features)["token_embeddings"]``, ``skiplist``
    and ``do_query_expansion``."""

    skiplist = [3, 4]

    def __init__(self, do_query_expansion, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.project = nn.Embedding(12, 8), nn.Linear(8, D)
        self.do_query_expansion = do_query_expansion
        self.to(dtype)

    def forward(self, features):
        return {"token_embeddings": self.project(torch.tanh(self.embed(features["input_ids"])))}


def tokenized(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 12, (rows, length), generator=g)
    mask = (torch.arange(length) < torch.randint(2, length + 1, (rows, 1), generator=g)).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def pylate_run(model, loss_fn, batch):
    model.zero_grad()
    loss = loss_fn(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def pylate_cases(stock, ours, backends):
    cases = {}
    for name in PYLATE:
        for expansion in (False, True):
            for size_average in (True, False):
                for columns in (2, 3):
                    for dtype in (torch.float64, torch.float32):
                        if dtype == torch.float32 and (expansion or not size_average or columns == 2):
                            continue
                        model = TinyColBERT(expansion, dtype)
                        batch = [tokenized(5, 5, 10), *(tokenized(5, 6, 1 + k) for k in range(columns - 1))]
                        kwargs = {"size_average": size_average, "temperature": 0.1,
                                  **({"mini_batch_size": 2} if name == "CachedContrastive" else {})}
                        key = (f"pylate {name} {'query-expansion' if expansion else 'query-mask'} "
                               f"{'mean' if size_average else 'sum'} {columns}-columns {str(dtype)[6:]}")
                        case = {"stock": pylate_run(model, getattr(stock, name)(model, **kwargs), batch),
                                "fastcl": {b: pylate_run(model, getattr(ours, name)(model, **kwargs, backend=b), batch)
                                           for b in backends},
                                "batch": batch[0]["input_ids"].shape[0]}
                        if not expansion and not size_average and columns == 3 and dtype == torch.float64:
                            off = {**kwargs, "temperature": 0.1 * 1.01}
                            case["perturbed"] = pylate_run(model, getattr(stock, name)(model, **off), batch)
                        cases[key] = case
    return cases


def main(argv: list[str]) -> None:
    (result_path,) = argv
    library = torchvision_without_its_ops()  # noqa: F841 (its definitions live as long as it does)
    import colpali_engine.loss
    import pylate.losses

    import fastcl
    from fastcl.integrations import colpali
    from fastcl.integrations import pylate as fastcl_pylate

    backends = fastcl.backends("cpu", torch.float64, op="maxsim")
    versions = {name: importlib.metadata.version(name) for name in
                ("pylate", "sentence-transformers", "colpali-engine", "torchvision", "transformers", "peft", "torch")}
    files = {"pylate": sys.modules[pylate.losses.Contrastive.__module__].__file__,
             "colpali": sys.modules[colpali_engine.loss.ColbertLoss.__module__].__file__,
             "sentence_transformers": sys.modules["sentence_transformers"].__file__, "fastcl": fastcl.__file__}
    torch.save({"versions": versions, "files": files, "backends": backends,
                "cases": {**colpali_cases(colpali_engine.loss, colpali, backends),
                          **pylate_cases(pylate.losses, fastcl_pylate, backends)}}, result_path)


if __name__ == "__main__":
    main(sys.argv[1:])
