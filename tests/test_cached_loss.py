"""``fastcl.cached_loss``: the cached step whose second pass runs in the caller's ``loss.backward()``.

Against the plain step (float64, dropout on, so only an exact RNG replay can match): the gradients,
the loss's own parameters, nothing reaching ``.grad`` before the backward, the gradient the loss
receives (a GradScaler's scale, a trainer's 1 / accumulation steps, a weight in a sum) reaching every
parameter, autocast re-entered by a backward run outside it, BatchNorm buffers, the generators, a
trainer's loop over steps, ``torch.no_grad()`` evaluation, and the errors. What it shares with
``cached_backward`` (inputs, frozen towers, argument checks) is tested in tests/test_cached.py; DDP in
tests/test_cached_distributed.py."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fastcl
import fastcl.cached
from cached_cases import build, grads, max_difference, plain_loss
from tolerances import assert_close, tol

LOSSES = ["clip", "siglip", "supcon"]
ROWS, CHUNK = 37, 8  # five chunks, the last one ragged


def cached_and_plain(loss, *, seed=5, dropout=0.3, backward=lambda value: value.backward()):
    """(cached loss, cached grads, plain loss, plain grads): the same models, dropout draws and backward."""
    results = []
    for cached in (True, False):
        setup = build(loss, ROWS, dropout=dropout)
        torch.manual_seed(seed)
        if cached:
            value = fastcl.cached_loss(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
        else:
            value = plain_loss(setup, CHUNK)
        assert value.requires_grad
        backward(value)
        results += [value.detach(), grads(setup)]
    return results


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_equal_the_plain_step_with_dropout(loss):
    """CLIP and SigLIP take a learnable scale (and bias) inside the loss: compared too."""
    value, got, plain_value, want = cached_and_plain(loss)
    assert_close(value, plain_value, tol("cached loss"), f"{loss}: loss")
    assert_close(got, want, tol("cached gradients"), f"{loss}: gradients")
    assert any("log_scale" in name for name in got) or loss == "supcon"


def test_nothing_reaches_the_parameters_before_backward():
    setup = build("siglip", ROWS, dropout=0.3)
    value = fastcl.cached_loss(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
    assert all(p.grad is None for p in setup.params.values())
    value.backward()
    assert all(p.grad is not None for p in setup.params.values())


def test_without_the_replay_the_gradients_would_be_wrong(monkeypatch):
    monkeypatch.setattr(fastcl.cached._RandomState, "replayed", lambda self: contextlib.nullcontext())
    _, got, _, want = cached_and_plain("clip")
    assert max_difference(got, want) > 1e-3


def test_the_gradient_the_loss_receives_reaches_every_parameter():
    """A GradScaler's scale (the plain step's scaled gradients, not the unscaled ones times the scale
    afterwards: in float16 those would underflow first), and the loss as a weighted term of a sum."""
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    _, got, _, want = cached_and_plain("siglip", backward=lambda value: scaler.scale(value).backward())
    assert_close(got, want, tol("cached gradients"), "scaled")
    _, unscaled, _, _ = cached_and_plain("siglip")
    assert max_difference(got, unscaled) > 1.0  # the scale did arrive

    def weighted(value):
        (0.3 * value + value.detach() ** 2).backward()

    _, got, _, want = cached_and_plain("clip", backward=weighted)
    assert_close(got, want, tol("cached gradients"), "0.3 x loss + constant")


def test_autocast_is_reentered_by_a_backward_run_outside_it():
    """The loss computed under CPU autocast (bfloat16), scaled, backpropagated after the ``with``
    block (as autocast's documentation asks): the second pass re-embeds in bfloat16 like the first,
    and the scaled gradients (a learnable scale outside every module among them) match the plain
    step's to bfloat16 precision."""
    results, seen = [], []
    for cached in (True, False):
        torch.manual_seed(0)
        img, txt = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 5)), nn.Linear(6, 5)
        img.register_forward_hook(lambda module, args, out, cached=cached: seen.append((cached, out.dtype)))
        scale = nn.Parameter(torch.tensor(2.0))
        x, y = torch.randn(20, 6), torch.randn(20, 6)

        def loss_fn(u, v, scale=scale):
            return fastcl.clip_loss(u, v, scale.exp())

        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if cached:
                loss = fastcl.cached_loss(loss_fn, [img, txt], [x, y], chunk_size=6)
            else:
                loss = loss_fn(*[torch.cat([e(i[a:a + 6]) for a in range(0, 20, 6)]) for e, i in ((img, x), (txt, y))])
        scaler.scale(loss).backward()
        results.append([p.grad for p in (*img.parameters(), *txt.parameters(), scale)])
    # 4 chunks: cached, twice but the first (it keeps its graph from the first pass)
    assert seen == [(True, torch.bfloat16)] * 7 + [(False, torch.bfloat16)] * 4
    assert_close(results[0], results[1], tol("cached autocast", torch.float32), "cached vs plain, scaled")


def test_batchnorm_statistics_are_updated_once_per_chunk():
    states = []
    for cached in (True, False):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)).double()
        x, y = torch.randn(23, 6, dtype=torch.float64), torch.randn(23, 6, dtype=torch.float64)
        if cached:
            loss = fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u, v, 2.0), [enc, enc], [x, y], chunk_size=8)
        else:
            loss = fastcl.clip_loss(*[torch.cat([enc(t[a:a + 8]) for a in range(0, 23, 8)]) for t in (x, y)], 2.0)
        loss.backward()
        bn = enc[1]
        states.append((bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(),
                       enc[0].weight.grad.clone()))
    assert_close(states[0], states[1], tol("regrouped"), "running statistics and gradient")
    assert states[0][2].item() == 6


def test_generators_stand_as_after_the_plain_forward_and_backward_leaves_them():
    """After the call: where the plain forward leaves them. A draw between forward and backward (a
    trainer's own randomness) is not replayed or undone by the backward's replay."""
    after_forward, between, after_backward = [], [], []
    for cached in (True, False):
        setup = build("clip", ROWS, dropout=0.3)
        torch.manual_seed(5)
        if cached:
            loss = fastcl.cached_loss(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
        else:
            loss = plain_loss(setup, CHUNK)
        after_forward.append(torch.get_rng_state())
        between.append(torch.rand(3))
        loss.backward()
        after_backward.append(torch.get_rng_state())
    assert torch.equal(*after_forward) and torch.equal(*between) and torch.equal(*after_backward)


class Trainer:
    """The loop of the HF Trainer (and of Lightning's automatic optimisation), cut to its bones:
    ``compute_loss`` returns a loss, the trainer divides it by the accumulation steps and calls
    ``backward`` on it, then steps the optimiser every ``accumulation`` micro-batches."""

    def __init__(self, setup, compute_loss, accumulation: int):
        self.setup, self.compute_loss, self.accumulation = setup, compute_loss, accumulation
        self.optimizer = torch.optim.SGD(list(setup.params.values()), lr=0.5)

    def train(self, batches) -> list[torch.Tensor]:
        logged = []
        for i, batch in enumerate(batches):
            loss = self.compute_loss(self.setup, batch)
            (loss / self.accumulation).backward()
            logged.append(loss.detach())
            if (i + 1) % self.accumulation == 0:
                self.optimizer.step()
                self.optimizer.zero_grad()
        return logged


def _cached_compute_loss(setup, batch):
    return fastcl.cached_loss(setup.loss_fn, setup.encoders, batch, chunk_size=CHUNK)


def _plain_compute_loss(setup, batch):
    return plain_loss(setup, CHUNK, inputs=batch)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_trainer_loop_over_steps_trains_as_the_plain_loss(accumulation):
    """Four micro-batches, dropout on: the same logged losses and parameters after every optimiser step
    (one backward per step, or two accumulated, each on a new loss object)."""
    runs = []
    for compute_loss in (_cached_compute_loss, _plain_compute_loss):
        setup = build("siglip", ROWS, dropout=0.3)
        gen = torch.Generator().manual_seed(3)
        batches = [[torch.randn(ROWS, inp.shape[1], generator=gen, dtype=torch.float64) for inp in setup.inputs]
                   for _ in range(4)]
        torch.manual_seed(7)
        logged = Trainer(setup, compute_loss, accumulation).train(batches)
        runs.append((logged, {n: p.detach().clone() for n, p in setup.params.items()}))
    (got_losses, got), (want_losses, want) = runs
    assert_close(got_losses, want_losses, tol("cached gradients"), "logged losses")
    assert_close(got, want, tol("cached gradients"), "parameters after the steps")
    assert max_difference(got, {n: p.detach() for n, p in build("siglip", ROWS, dropout=0.3).params.items()}) > 1e-3


def test_under_no_grad_it_is_the_chunked_forward_and_the_loss():
    """A trainer's evaluation: one pass, buffers updated once per chunk, the loss as the plain one."""
    values = []
    for cached in (True, False):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)).double()
        x, y = torch.randn(23, 6, dtype=torch.float64), torch.randn(23, 6, dtype=torch.float64)
        with torch.no_grad():
            if cached:
                loss = fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u, v, 2.0), [enc, enc], [x, y], chunk_size=8)
            else:
                loss = fastcl.clip_loss(*[torch.cat([enc(t[a:a + 8]) for a in range(0, 23, 8)]) for t in (x, y)], 2.0)
        assert not loss.requires_grad
        values.append((loss, enc[1].running_mean.clone(), enc[1].num_batches_tracked.clone()))
    assert_close(values[0], values[1], tol("regrouped"), "loss and running statistics")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")  # torch's, about .grad cycles
def test_a_second_backward_and_create_graph_raise():
    setup = build("clip", ROWS, dropout=0.3)

    def new_loss():
        return fastcl.cached_loss(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)

    loss = new_loss()
    loss.backward()
    with pytest.raises(RuntimeError, match="this loss was backpropagated already"):
        loss.backward()
    loss = new_loss()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="this loss was backpropagated already"):
        loss.backward()
    before = grads(setup)
    with pytest.raises(RuntimeError, match="create_graph=True is not supported"):
        new_loss().backward(create_graph=True)
    assert_close(grads(setup), before, tol("exact"), "no gradient added by the refused backward")


def test_arguments_are_checked_as_by_cached_backward():
    enc, x = nn.Linear(3, 2), torch.randn(5, 3)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u, v, 1.0), [enc, enc], [x, x], chunk_size=0)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-d\) loss, got shape \(5,\)"):
        fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u, v, 1.0, reduction="none"), [enc, enc], [x, x],
                           chunk_size=2)
    with pytest.raises(ValueError, match="does not require grad"):
        fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u.detach(), v.detach(), 1.0), [enc, enc], [x, x],
                           chunk_size=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-d\) loss"):
        fastcl.cached_loss(lambda u, v: fastcl.clip_loss(u, v, 1.0, reduction="none"), [enc, enc], [x, x],
                           chunk_size=2)
