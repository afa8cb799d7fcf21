"""torch.compile(fullgraph=True) traces a training step through every loss without a graph break
(the engine's primitives are torch.library custom ops with fake implementations and registered
autograd) and matches eager, values and gradients."""
import pytest
import torch

import fastcl
from cases import CASES, leaves, run
from tolerances import assert_runs_close, tol

ENGINES = [b for b in fastcl.backends("cpu") if b in ("chunked", "cpu")]
# One case per loss, the first (small) one of each, plus the options that take other paths.
CHOSEN = [next(c for c in CASES if c.loss == loss) for loss in sorted({c.loss for c in CASES})] + [
    c for c in CASES if c.id in {"clip_loss-5x11-labels", "clip_loss-13x13-negatives", "siglip_loss-10x10-none-norm",
                                 "supcon_loss-N13-singletons", "dcl_loss-B11-vmf", "mw_loss-11x11-none",
                                 "siglip_loss-8x8-matryoshka-learned", "siglip_loss-9x9-matryoshka-none-weights"}]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    # lets dynamo trace the .backward() inside the step
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        yield
    torch._dynamo.reset()


def compiled_run(case, backend, compiler):
    args, kwargs = case.inputs(torch.float32)
    grad_leaves = leaves(args, kwargs)

    def step(args, kwargs):
        out = case.fn(*args, backend=backend, **kwargs)
        weights = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
        total = (out * weights).sum()
        total.backward()
        return out.detach()

    out = torch.compile(step, fullgraph=True, backend=compiler)(args, kwargs)
    return out, [t.grad for t in grad_leaves]


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("case", CHOSEN, ids=lambda c: c.id)
def test_fullgraph_training_step_matches_eager(case, backend):
    assert_runs_close(compiled_run(case, backend, "aot_eager"), run(case, backend, torch.float32),
                      tol("compiled", torch.float32), f"{backend} compiled")


def test_inductor_compiles_a_clip_step():
    case = next(c for c in CASES if c.id == "clip_loss-7x7-scale")
    got_out, got_grads = compiled_run(case, "auto", "inductor")
    want_out, want_grads = run(case, "auto", torch.float32)
    assert_runs_close((got_out, got_grads), (want_out, want_grads), tol("compiled", torch.float32), "inductor")
