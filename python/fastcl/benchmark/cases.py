"""What one benchmark case runs: the naive baselines, the anchors, fastcl, the GEMM floor.

``make_step(spec)`` builds the inputs and returns a closure doing one forward+backward (gradients
for the features, ``logit_scale`` and, for SigLIP, ``logit_bias``). ``python -m
fastcl.benchmark.cases --case <json>`` measures one case and prints one JSON line; the sweep runs
that in a fresh process per case (see harness.py).

Implementations (``spec["impl"]``):
  naive      what a user writes without fastcl (below; restated from open_clip, lightly, PML)
  <backend>  ``fastcl.<loss>_loss(..., backend=<backend>)``
  open_clip  ``open_clip.loss.ClipLoss`` / ``SigLipLoss`` when open_clip is installed
  inf_cl     Inf-CL's ``cal_inf_loss`` (Triton, CUDA only) when inf_cl is installed
  torch_lce  ``torch.nn.functional.linear_cross_entropy`` once per direction (CLIP), torch >= 2.13
  floor      four blocked ``x @ y.T`` GEMMs (loss "gemm"); a loss's floor, what its fused version
             cannot beat, is ``floor_gemms(loss)`` of them (``floor_seconds``)
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys

import torch
import torch.nn.functional as F

from . import harness

LOSSES = ("clip", "siglip", "ntxent", "supcon", "maxsim")
# Late interaction (maxsim): N queries of MAXSIM_LQ tokens against N documents of MAXSIM_LD tokens,
# D = --d; ColBERT-like queries, ColPali-like pages.
MAXSIM_LQ, MAXSIM_LD = 32, 256
SUPCON_CLASSES = 100  # labels for SupCon: N rows over this many classes
# Resident N x N copies naive PyTorch holds at its peak (logits, softmax/its gradient, the
# SigLIP label matrix and products), measured at N=8192 fp32: about 4.1 for CLIP and 5.1 for
# SigLIP; rounded up so the estimate errs on the safe side. The anchors materialise the same.
NAIVE_NXN_COPIES = {"clip": 5, "siglip": 6, "ntxent": 6, "supcon": 7,
                    # maxsim: the [N, N, Lq, Ld] token similarities, then their gradient (one at a time,
                    # plus the scatter's), counted in N x N units
                    "maxsim": 2 * MAXSIM_LQ * MAXSIM_LD}
# The floor multiplies into a reused output buffer of at most this size, in row blocks: it
# measures GEMM arithmetic only (the fused loss never allocates N x N either) and still runs at
# N=65536, where one x @ y.T would be 16 GiB.
FLOOR_BUFFER_BYTES = 256 * harness.MiB
# GEMMs of x @ y.T's shape that one forward+backward cannot avoid (README "How it works"): 4 for the
# log-sum-exp losses (CLIP, InfoNCE, NT-Xent, SupCon: forward 1, backward 3 = recompute S, G @ y,
# G.T @ x); 3 for the pointwise losses (SigLIP, MW), whose gradients are computed in the forward
# pass (S, G @ y, G.T @ x), so their backward only rescales.
LSE_FLOOR_GEMMS, POINTWISE_FLOOR_GEMMS = 4, 3
# Each case is timed over at least --repeat calls and at least this long (small N: many calls).
MIN_TIMED_SECONDS = 0.5
POINTWISE_LOSSES = ("siglip", "mw")
FLOOR_GEMMS = LSE_FLOOR_GEMMS  # what the floor case times, once per shape, for every loss to share
FLOOR_NOTE = (f"x floor = time / the loss's GEMM floor: {LSE_FLOOR_GEMMS} x (x @ y.T) for the log-sum-exp losses, "
              f"{POINTWISE_FLOOR_GEMMS} for {' and '.join(POINTWISE_LOSSES)} (gradients computed in the forward pass)")
# Third-party implementations compared when installed: the module to import, its pip name, the
# losses it implements, the devices it runs on, and whether it holds N x N temporaries (then the
# naive cap applies to it too).
ANCHORS = {
    "open_clip": {"module": "open_clip", "pip": "open-clip-torch", "losses": ("clip", "siglip"),
                  "devices": ("cpu", "cuda"), "dense": True},
    "inf_cl": {"module": "inf_cl", "pip": "inf-cl", "losses": ("clip",), "devices": ("cuda",), "dense": False},
    # torch's own fused linear + cross-entropy (torch >= 2.13; chunked on CUDA, the materialised
    # reference elsewhere): what a user tries first for InfoNCE, here both directions for CLIP
    "torch_lce": {"module": "torch", "attr": "linear_cross_entropy", "pip": "torch>=2.13", "losses": ("clip",),
                  "devices": ("cpu", "cuda"), "dense": True},
}


def floor_gemms(loss: str) -> int:
    """How many ``x @ y.T`` GEMMs one forward+backward of ``loss`` cannot avoid (the floor case itself,
    loss ``"gemm"``, times ``FLOOR_GEMMS``). MaxSim: the token-similarity GEMM
    ``[N*Lq, D] x [D, N*Ld]`` once forward and once again in backward (its gradients are a gather and a
    scatter, not GEMMs), counted in flops of ``x @ y.T``-sized products."""
    if loss == "maxsim":
        return 2 * MAXSIM_LQ * MAXSIM_LD
    return POINTWISE_FLOOR_GEMMS if loss in POINTWISE_LOSSES else LSE_FLOOR_GEMMS


def floor_seconds(loss: str, floor_case_s: float) -> float:
    """``loss``'s GEMM floor from the floor case's time (``FLOOR_GEMMS`` GEMMs of the same shape)."""
    return floor_case_s * floor_gemms(loss) / FLOOR_GEMMS


# --- the naive baselines: what a user writes without fastcl -----------------------------------

def naive_clip(x, y, logit_scale):
    """open_clip ClipLoss (one process): cross-entropy over image->text and text->image logits.
    One GEMM, transposed for the second direction (open_clip's get_logits computes
    ``y @ x.T`` again, which only makes naive slower; we compare against the stronger one)."""
    logits = logit_scale * x @ y.T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def naive_siglip(x, y, logit_scale, logit_bias):
    """open_clip SigLipLoss (one process), exactly: a dense +-1 label matrix and logsigmoid."""
    logits = logit_scale * x @ y.T + logit_bias
    labels = 2 * torch.eye(x.shape[0], device=x.device, dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / x.shape[0]


def naive_ntxent(z, temperature=0.5):
    """SimCLR NT-Xent as lightly writes it (V = 2, rows view-major): one (2B)^2 logit matrix, self
    similarity masked out, cross-entropy with the other view as target. Features already unit-norm."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.arange(n, device=z.device).roll(n // 2)
    return F.cross_entropy(logits, targets)


def naive_supcon(z, labels, temperature=0.1):
    """Supervised contrastive loss as pytorch-metric-learning computes it: dense logits, dense
    positive mask, log-softmax without the diagonal, mean over each anchor's positives."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits - logits.masked_fill(self_mask, float("-inf")).logsumexp(1, keepdim=True)
    n_pos = positives.sum(1)
    per_row = -(log_prob * positives).sum(1) / n_pos.clamp(min=1)
    return per_row[n_pos > 0].mean()


def naive_maxsim(q, d, temperature=0.02):
    """ColBERT's in-batch loss as colpali-engine writes it: the token similarities ``[B, N, Lq, Ld]``
    in one einsum, the max over document tokens, the sum over query tokens, cross-entropy over
    documents (its backward scatters into a zero tensor of the same size)."""
    scores = torch.einsum("iad,jtd->ijat", q, d).max(dim=3)[0].sum(dim=2)
    return F.cross_entropy(scores / temperature, torch.arange(q.shape[0], device=q.device))


# --- the anchors ------------------------------------------------------------------------------

def unavailable(impl: str, loss: str, device: str) -> tuple[str, str] | None:
    """(status, note) when anchor ``impl`` cannot run this case here, None when it can (or when
    ``impl`` is not an anchor). Checked without importing, so the parent stays light."""
    anchor = ANCHORS.get(impl)
    if anchor is None:
        return None
    if importlib.util.find_spec(anchor["module"]) is None or \
            ("attr" in anchor and not hasattr(F, anchor["attr"])):
        return "not installed", f"pip install {anchor['pip']} to compare"
    if device not in anchor["devices"]:
        return "unsupported", f"{impl} runs on {', '.join(anchor['devices'])} only"
    return None


def _inf_cl_loss():
    """Inf-CL's loss, both directions like CLIP's. Its ring implementation talks to a process group
    even on one GPU; a one-rank group over an in-memory store needs no ports."""
    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    return lambda x, y, s: (cal_inf_loss(x, y, scale=s) + cal_inf_loss(y, x, scale=s)) / 2


def _torch_lce(x, y, s):
    """CLIP from ``F.linear_cross_entropy``: each direction's logits are ``(s x) @ y.T``, as a
    classifier's with ``y`` as its weight."""
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.linear_cross_entropy(s * x, y, labels) + F.linear_cross_entropy(s * y, x, labels)) / 2


def _anchor_loss(impl: str, loss: str):
    if impl == "torch_lce":
        return _torch_lce
    if impl == "inf_cl":
        return _inf_cl_loss()
    from open_clip.loss import ClipLoss, SigLipLoss

    return ClipLoss() if loss == "clip" else SigLipLoss()


# --- one case, in its own process ------------------------------------------------------------

def make_step(spec: dict):
    """Create the inputs and return a closure doing one forward+backward (or the floor GEMMs)."""
    n, d, dtype = spec["n"], spec["d"], getattr(torch, spec["dtype"])
    device = spec.get("device", "cpu")
    gen = torch.Generator().manual_seed(0)
    # Unit-norm features and open_clip's usual scale/bias, so exp() sees realistic logits.
    x = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)
    y = F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device, dtype)

    if spec["impl"] == "floor":
        rows = max(1, min(n, FLOOR_BUFFER_BYTES // (n * x.element_size())))
        out = x.new_zeros(rows, n)  # touched now: its page faults are not GEMM work

        def floor():
            for _ in range(FLOOR_GEMMS):
                for r0 in range(0, n, rows):
                    r1 = min(r0 + rows, n)
                    torch.mm(x[r0:r1], y.T, out=out[: r1 - r0])
        return floor

    loss, impl = spec["loss"], spec["impl"]
    if loss == "maxsim":
        return _maxsim_step(n, d, dtype, device, impl, gen)
    x.requires_grad_()
    y.requires_grad_()
    scalar = lambda v: torch.tensor(v, device=device, requires_grad=True)
    if loss == "clip":
        params = [x, y, scalar(100.0)]
    elif loss == "siglip":  # SigLIP's initialisation: scale 10, bias -10
        params = [x, y, scalar(10.0), scalar(-10.0)]
    else:  # self-similarity losses: x holds all N = V * B rows
        params = [x]
    labels = torch.randint(0, SUPCON_CLASSES, (n,), generator=gen).to(device)
    if impl == "naive":
        loss_fn = {"clip": naive_clip, "siglip": naive_siglip, "ntxent": naive_ntxent,
                   "supcon": lambda z: naive_supcon(z, labels)}[loss]
    elif impl in ANCHORS:
        loss_fn = _anchor_loss(impl, loss)
    else:
        import fastcl

        loss_fn = {
            "clip": lambda *a: fastcl.clip_loss(*a, backend=impl),
            "siglip": lambda *a: fastcl.siglip_loss(*a, backend=impl),
            "ntxent": lambda z: fastcl.ntxent_loss(z.view(2, n // 2, d), 0.5, backend=impl),
            "supcon": lambda z: fastcl.supcon_loss(z, labels, 0.1, backend=impl),
        }[loss]

    def step():
        for p in params:  # gradients are outputs: each call allocates them afresh, as training does
            p.grad = None
        loss_fn(*params).backward()
    return step


def _maxsim_step(n, d, dtype, device, impl, gen):
    """Unit-norm tokens (ColBERT normalises them), ``n`` queries against ``n`` documents."""
    q = F.normalize(torch.randn(n, MAXSIM_LQ, d, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    docs = F.normalize(torch.randn(n, MAXSIM_LD, d, generator=gen), dim=-1).to(device, dtype).requires_grad_()
    if impl == "naive":
        loss_fn = naive_maxsim
    else:
        import fastcl

        loss_fn = lambda a, b: fastcl.maxsim_loss(a, b, 0.02, backend=impl)  # noqa: E731

    def step():
        q.grad = docs.grad = None
        loss_fn(q, docs).backward()
    return step


def _warm_up_n(spec: dict) -> int:
    if spec["impl"] != "auto" or spec["loss"] == "maxsim":
        return 64
    from ..backend import registry

    op = "pointwise" if spec["loss"] in POINTWISE_LOSSES else "lse"
    small = 2
    while registry.materialises(op, (small + 2) ** 2, spec["d"]):  # the largest N that materialises S at D
        small += 2
    return 64 if spec["n"] <= small else min(spec["n"], small + 2)  # even: NT-Xent's two views


def run_paired(specs: list[dict]) -> dict:
    """Time the cases of one point (the same loss and shape) in one process, interleaved
    (``harness.time_interleaved``), each after its warm-up and a first call. Per case: the median
    time, and the median over rounds of its time over the first case's (naive's) in that round."""
    device = specs[0].get("device", "cpu")
    steps = {}
    for spec in specs:
        make_step({**spec, "n": _warm_up_n(spec)})()
        steps[spec["impl"]] = make_step(spec)
        steps[spec["impl"]]()
    times = harness.time_interleaved(steps, MIN_TIMED_SECONDS * len(steps), max(spec["repeat"] for spec in specs),
                                     device)
    first = times[specs[0]["impl"]]
    return {"status": "ok", "paired": {
        impl: {"median_s": statistics.median(t), "x_first": harness.paired_ratio(t, first),
               "rounds": len(t)} for impl, t in times.items()}}


def run_case(spec: dict) -> dict:
    """Measure one case; an out-of-memory error is a result ("oom"), anything else a bug. A spec
    with ``paired`` (a list of cases) times those cases interleaved (``run_paired``)."""
    if "paired" in spec:
        return run_paired(spec["paired"])
    device = spec.get("device", "cpu")
    try:
        # The warm-up keeps D (compiled kernels are specialised on it) and shrinks N; for auto, to the
        # smallest N that still takes the path this N takes (a small S is materialised, registry.py).
        warm_up = None if spec["impl"] == "floor" else make_step({**spec, "n": _warm_up_n(spec)})
        return {"status": "ok", **harness.measure(make_step(spec), spec["repeat"], warm_up, device,
                                                  min_seconds=MIN_TIMED_SECONDS)}
    except Exception as exc:  # classified: re-raised (a bug, "failed") unless it is memory
        if not harness.is_oom(exc):
            raise
        return {"status": "oom", "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--case":
        sys.exit("usage: python -m fastcl.benchmark.cases --case '<spec json>' (run by fastcl bench)")
    print(json.dumps(run_case(json.loads(sys.argv[2]))))
