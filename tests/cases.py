"""Sample inputs for every loss: odd sizes (1, primes, tile tails), M != N, every option.

Each ``Case`` builds fresh, seeded inputs in any dtype, so a backend and the reference see the same
values through separate autograd graphs.
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastcl


@dataclass(frozen=True)
class Case:
    loss: str                        # name of the public function in fastcl
    shapes: str                      # readable test id
    build: Callable                  # (rand, dtype) -> (args, kwargs)
    gradcheck: bool = True           # False where the spec stops a gradient on purpose, or
                                     # where a numerical Jacobian would take minutes
    tags: frozenset = field(default_factory=frozenset)

    @property
    def fn(self) -> Callable:
        return getattr(fastcl, self.loss)

    @property
    def id(self) -> str:
        return f"{self.loss}-{self.shapes}"

    def inputs(self, dtype: torch.dtype, requires_grad: bool = True):
        gen = torch.Generator().manual_seed(zlib.crc32(self.id.encode()))

        def rand(*shape):
            t = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
            return t.requires_grad_(requires_grad)

        def randint(high, *shape):
            return torch.randint(0, high, shape, generator=gen)

        return self.build(rand, randint, dtype)


def scale(value, dtype):
    return torch.tensor(value, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32)


def _clip_cases():
    yield Case("clip_loss", "1x1", lambda r, ri, dt: ((r(1, 3), r(1, 3), 2.0), {}))
    yield Case("clip_loss", "7x7-scale", lambda r, ri, dt: ((r(7, 5), r(7, 5), scale(3.1, dt).requires_grad_()), {}))
    yield Case("clip_loss", "37x37-smooth-sum", lambda r, ri, dt: (
        (r(37, 13), r(37, 13), scale(1.7, dt).requires_grad_()), {"label_smoothing": 0.1, "reduction": "sum"}))
    yield Case("clip_loss", "11x11-none-norm", lambda r, ri, dt: (
        (r(11, 6), r(11, 6), 9.0), {"reduction": "none", "normalize": True}))
    yield Case("clip_loss", "5x11-labels", lambda r, ri, dt: (
        (r(5, 4), r(11, 4), 1.3), {"labels": ri(11, 5), "bidirectional": False, "label_smoothing": 0.2}))
    yield Case("clip_loss", "13x13-negatives", lambda r, ri, dt: (
        (r(13, 7), r(13, 7), scale(2.0, dt).requires_grad_()),
        {"extra_negatives": r(6, 7), "bidirectional": False, "label_smoothing": 0.05, "reduction": "none"}))
    yield Case("clip_loss", "300x533-labels-many-tiles", lambda r, ri, dt: (
        (r(300, 20), r(533, 20), 1.1), {"labels": ri(533, 300), "bidirectional": False}), gradcheck=False)
    yield Case("clip_loss", "290x290-many-tiles", lambda r, ri, dt: ((r(290, 9), r(290, 9), 2.5), {}), gradcheck=False)
    yield Case("infonce_loss", "9x9-queue", lambda r, ri, dt: (
        (r(9, 5), r(9, 5), 0.5), {"extra_negatives": r(17, 5)}))
    yield Case("infonce_loss", "3x8-labels-none", lambda r, ri, dt: (
        (r(3, 5), r(8, 5)), {"temperature": 0.9, "labels": ri(8, 3), "reduction": "none"}))
    yield Case("infonce_loss", "6x6-learned-t-none", lambda r, ri, dt: (
        (r(6, 5), r(6, 5), scale(0.3, dt).requires_grad_()), {"reduction": "none"}))
    # false negatives: 5 key values, so most rows lose columns, targets keyed or not
    yield Case("clip_loss", "17x17-keys", lambda r, ri, dt: (
        (r(17, 6), r(17, 6), scale(2.2, dt).requires_grad_()), {"row_keys": ri(5, 17), "col_keys": ri(5, 17)}))
    yield Case("clip_loss", "7x12-labels-negatives-keys-none", lambda r, ri, dt: (
        (r(7, 5), r(12, 5), 1.6), {"labels": ri(12, 7), "bidirectional": False, "extra_negatives": r(4, 5),
                                    "row_keys": ri(4, 7), "col_keys": ri(4, 16), "reduction": "none"}))
    yield Case("infonce_loss", "8x19-joint-positives-keys-none", lambda r, ri, dt: (
        (r(8, 5), r(19, 5), scale(0.7, dt).requires_grad_()),
        {"labels": ri(19, 8), "positives": ri(20, 8, 3) - 1, "multi_positive": "joint", "row_keys": ri(4, 8),
         "col_keys": ri(4, 19), "reduction": "none"}))
    yield Case("infonce_loss", "300x300-joint-positives-many-tiles", lambda r, ri, dt: (
        (r(300, 9), r(300, 9), 0.3), {"positives": ri(301, 300, 2) - 1, "multi_positive": "joint"}),
        gradcheck=False)
    yield Case("clip_loss", "9x9-matryoshka-norm-scale", lambda r, ri, dt: (
        (r(9, 21), r(9, 21), scale(2.4, dt).requires_grad_()),
        {"matryoshka_dims": (3, 8, 21), "matryoshka_weights": (1.0, 0.5, 2.0), "normalize": True}))
    yield Case("infonce_loss", "7x7-matryoshka-queue-none", lambda r, ri, dt: (
        (r(7, 10), r(7, 10), 0.6), {"matryoshka_dims": (5, 9), "extra_negatives": r(4, 10), "reduction": "none"}))
    yield Case("infonce_loss", "290x290-keys-many-tiles", lambda r, ri, dt: (
        (r(290, 9), r(290, 9), 0.4), {"row_keys": ri(40, 290), "col_keys": ri(40, 290)}), gradcheck=False)


def _siglip_cases():
    yield Case("siglip_loss", "1x1", lambda r, ri, dt: ((r(1, 2), r(1, 2), 1.5, -0.5), {}))
    yield Case("siglip_loss", "23x23-params", lambda r, ri, dt: (
        (r(23, 9), r(23, 9), scale(2.2, dt).requires_grad_(), scale(-1.0, dt).requires_grad_()), {}))
    yield Case("siglip_loss", "10x10-none-norm", lambda r, ri, dt: (
        (r(10, 4), r(10, 4), scale(5.0, dt).requires_grad_(), scale(-2.0, dt).requires_grad_()),
        {"reduction": "none", "normalize": True}))
    yield Case("siglip_loss", "270x270-many-tiles", lambda r, ri, dt: (
        (r(270, 8), r(270, 8), scale(3.0, dt).requires_grad_(), scale(-4.0, dt).requires_grad_()), {}), gradcheck=False)
    yield Case("siglip_loss", "6x6-sum", lambda r, ri, dt: ((r(6, 3), r(6, 3), 0.7, 0.3), {"reduction": "sum"}))
    yield Case("siglip_loss", "8x8-matryoshka-learned", lambda r, ri, dt: (
        (r(8, 12), r(8, 12), scale(3.0, dt).requires_grad_(), scale(-2.0, dt).requires_grad_()),
        {"matryoshka_dims": (2, 7, 12), "normalize": True}))
    yield Case("siglip_loss", "9x9-matryoshka-none-weights", lambda r, ri, dt: (
        (r(9, 11), r(9, 11), scale(2.0, dt).requires_grad_(), scale(-1.5, dt).requires_grad_()),
        {"matryoshka_dims": (3, 4, 11), "matryoshka_weights": (0.5, 2.0, 1.0), "reduction": "none"}))


def _self_similarity_cases():
    yield Case("ntxent_loss", "V2-B1", lambda r, ri, dt: ((r(2, 1, 3),), {}))
    yield Case("ntxent_loss", "V3-B7-list", lambda r, ri, dt: (([r(7, 5), r(7, 5), r(7, 5)], 0.3), {}))
    yield Case("ntxent_loss", "V2-B17-none-norm", lambda r, ri, dt: (
        (r(2, 17, 6),), {"temperature": 0.2, "reduction": "none", "normalize": True}))
    yield Case("ntxent_loss", "V2-B9-learned-t", lambda r, ri, dt: ((r(2, 9, 5), scale(0.4, dt).requires_grad_()), {}))
    yield Case("ntxent_loss", "V2-B150-many-tiles", lambda r, ri, dt: ((r(2, 150, 7),), {"temperature": 0.3}),
               gradcheck=False)
    yield Case("supcon_loss", "N13-singletons", lambda r, ri, dt: (
        (r(13, 5), torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 0, 7])), {"temperature": 0.5}))
    yield Case("supcon_loss", "V2-B9-views", lambda r, ri, dt: ((r(2, 9, 4), ri(3, 9)), {"reduction": "sum"}))
    yield Case("supcon_loss", "N1", lambda r, ri, dt: ((r(1, 4), torch.tensor([3])), {}))
    yield Case("supcon_loss", "N8-none-norm", lambda r, ri, dt: (
        (r(8, 3), ri(3, 8)), {"reduction": "none", "normalize": True, "temperature": 0.7}))
    yield Case("dcl_loss", "B2", lambda r, ri, dt: ((r(2, 3), r(2, 3)), {}))
    yield Case("dcl_loss", "B9-norm-none", lambda r, ri, dt: (
        (r(9, 5), r(9, 5), 0.4), {"normalize": True, "reduction": "none"}))
    yield Case("dcl_loss", "B11-vmf", lambda r, ri, dt: (
        (r(11, 6), r(11, 6), 0.5), {"weighting": "vmf", "sigma": 0.7, "normalize": True}), gradcheck=False)
    yield Case("dcl_loss", "B7-weightfn", lambda r, ri, dt: (
        (r(7, 4), r(7, 4), 0.6), {"weighting": lambda u, v: 1 + (u * v).sum(-1).tanh()}))


def _multiview_cases():
    yield Case("mv_infonce_loss", "V2-B1", lambda r, ri, dt: ((r(2, 1, 3),), {}))
    yield Case("mv_infonce_loss", "V3-B5", lambda r, ri, dt: ((r(3, 5, 4), 0.5), {}))
    yield Case("mv_infonce_loss", "V4-B7-none-norm", lambda r, ri, dt: (
        (r(4, 7, 6),), {"temperature": 0.3, "reduction": "none", "normalize": True}))
    yield Case("mv_dhel_loss", "V2-B2", lambda r, ri, dt: ((r(2, 2, 3),), {}))
    yield Case("mv_dhel_loss", "V3-B5-list", lambda r, ri, dt: (([r(5, 4), r(5, 4), r(5, 4)], 0.5), {}))
    yield Case("mv_dhel_loss", "V4-B7-sum-norm", lambda r, ri, dt: (
        (r(4, 7, 6),), {"temperature": 0.3, "reduction": "sum", "normalize": True}))


def _other_cases():
    yield Case("cwcl_loss", "1x1", lambda r, ri, dt: ((r(1, 3), r(1, 3), 2.0, r(1, 4)), {}))
    yield Case("cwcl_loss", "9x9-scale", lambda r, ri, dt: (
        (r(9, 5), r(9, 5), scale(2.5, dt).requires_grad_(), r(9, 7).detach()), {}))
    yield Case("cwcl_loss", "12x12-rows-none", lambda r, ri, dt: (
        (r(12, 4), r(12, 4), 1.5, r(12, 3).detach()), {"bidirectional": False, "reduction": "none"}))
    yield Case("mw_loss", "2x2", lambda r, ri, dt: ((r(2, 3), r(2, 3)), {}))
    yield Case("mw_loss", "7x7-learned-t", lambda r, ri, dt: ((r(7, 4), r(7, 4), scale(0.5, dt).requires_grad_()), {}))
    yield Case("mw_loss", "11x11-none", lambda r, ri, dt: ((r(11, 5), r(11, 5), 0.5), {"reduction": "none"}))
    yield Case("mw_loss", "260x300-labels-many-tiles", lambda r, ri, dt: (
        (r(260, 6), r(300, 6), 0.5), {"labels": ri(300, 260), "reduction": "none"}), gradcheck=False)
    yield Case("mw_loss", "6x9-labels-norm", lambda r, ri, dt: (
        (r(6, 4), r(9, 4), 0.2), {"labels": ri(9, 6), "normalize": True, "reduction": "sum"}))
    yield Case("uniformity_loss", "N2", lambda r, ri, dt: ((r(2, 3),), {}))
    yield Case("uniformity_loss", "N17-norm", lambda r, ri, dt: ((r(17, 5), 1.5), {"normalize": True}))
    yield Case("uniformity_loss", "N13-none", lambda r, ri, dt: ((r(13, 4),), {"t": 0.7, "reduction": "none"}))
    yield Case("uniformity_loss", "N11-learned-t", lambda r, ri, dt: (
        (r(11, 5), scale(1.2, dt).requires_grad_()), {"normalize": True}))
    yield Case("alignment_loss", "N1", lambda r, ri, dt: ((r(1, 3), r(1, 3)), {}))
    yield Case("alignment_loss", "N9-alpha-none", lambda r, ri, dt: (
        (r(9, 4), r(9, 4), 1.5), {"reduction": "none", "normalize": True}))


def _listed(ri, high, rows, width):
    """[rows, width] column indices below ``high``, -1 padded (about one in ``high + 1``), the last
    column a repeat of the first: duplicates count once."""
    out = ri(high + 1, rows, width) - 1
    out[:, -1] = out[:, 0]
    out[0] = -1  # a row with nothing listed
    return out


def _guided(r, ri, m, n, d):
    """(labels, guide): guide embeddings whose targets lean towards their rows, so that a few other
    columns come within the margin of a row's target and leave, and never all."""
    labels, gx, gy = ri(n, m), r(m, d).detach(), r(n, d).detach()
    gy[labels] = gy[labels] + 2 * gx
    return labels, (gx, gy)


def _excluding_cases():
    """Losses that leave listed pairs out inside the tiles (op ``lse_exclude``): decoupled positives
    and GISTEmbed's guide. Kept out of CASES: a backend without the op refuses them (each fused
    backend's tests run them: test_triton, test_cuda_host, test_cuda)."""
    yield Case("infonce_loss", "37x70-decoupled-positives-keys-none", lambda r, ri, dt: (
        (r(37, 5), r(70, 5), scale(0.7, dt).requires_grad_()),
        {"labels": ri(70, 37), "positives": _listed(ri, 70, 37, 4), "multi_positive": "decoupled",
         "row_keys": ri(4, 37), "col_keys": ri(4, 70), "reduction": "none"}))
    yield Case("clip_loss", "13x9-decoupled-positives-negatives", lambda r, ri, dt: (
        (r(13, 6), r(9, 6), 1.3), {"labels": ri(9, 13), "bidirectional": False, "extra_negatives": r(5, 6),
                                   "positives": _listed(ri, 9, 13, 3), "multi_positive": "decoupled"}))
    yield Case("infonce_loss", "300x300-decoupled-positives-many-tiles", lambda r, ri, dt: (
        (r(300, 9), r(300, 9), 0.3), {"positives": _listed(ri, 300, 300, 3), "multi_positive": "decoupled"}),
        gradcheck=False)
    yield Case("infonce_loss", "37x70-guide-none", lambda r, ri, dt: (
        (r(37, 5), r(70, 5)), dict(zip(("labels", "guide"), _guided(r, ri, 37, 70, 3)), temperature=0.6,
                                   guide_margin=0.2, reduction="none")))
    yield Case("clip_loss", "13x9-guide-negatives-joint-positives", lambda r, ri, dt: (
        (r(13, 6), r(9, 6), scale(1.9, dt).requires_grad_()),
        {"labels": ri(9, 13), "bidirectional": False, "extra_negatives": r(7, 6), "positives": _listed(ri, 9, 13, 2),
         "multi_positive": "joint", "guide": (r(13, 4).detach(), r(16, 4).detach()), "guide_margin": -0.1}))
    yield Case("infonce_loss", "290x300-guide-many-tiles", lambda r, ri, dt: (
        (r(290, 8), r(300, 8)), dict(zip(("labels", "guide"), _guided(r, ri, 290, 300, 4)), temperature=0.5,
                                     guide_margin=0.5)), gradcheck=False)


CASES = [*_clip_cases(), *_siglip_cases(), *_self_similarity_cases(), *_multiview_cases(), *_other_cases()]
LOSSES = sorted({c.loss for c in CASES})
EXCLUDING_CASES = list(_excluding_cases())


def map_tensors(value, fn):
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def leaves(args, kwargs) -> list[torch.Tensor]:
    """The tensors of a case that take a gradient (features, scales), in a fixed order."""
    found = []
    map_tensors((args, kwargs), lambda t: found.append(t) if t.requires_grad else None)
    return found


def widened(t: torch.Tensor) -> torch.Tensor:
    """The same values in float64, as a new leaf that wants a gradient where ``t`` did."""
    if not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(t.requires_grad)


def run(case: Case, backend: str, dtype: torch.dtype, *, transform=None, in_float64: bool = False):
    """Loss and gradients of every leaf, for inputs built in ``dtype``.

    ``in_float64`` evaluates those (rounded) values in float64: the yardstick for low precision.
    ``transform`` maps every tensor after the leaves are taken (e.g. to other strides).
    Non-scalar outputs are contracted with fixed, distinct weights so every row's gradient counts.
    """
    args, kwargs = case.inputs(dtype)
    if in_float64:
        args, kwargs = map_tensors((args, kwargs), widened)
    grad_leaves = leaves(args, kwargs)
    if transform is not None:
        args, kwargs = map_tensors((args, kwargs), transform)
    out = case.fn(*args, backend=backend, **kwargs)
    weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    total = (out * weights).sum()
    grads = torch.autograd.grad(total, grad_leaves, allow_unused=True) if grad_leaves else ()
    return out.detach(), [None if g is None else g.detach() for g in grads]
