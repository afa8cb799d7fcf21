"""``fastcl.cached_backward`` in one process: the parameter gradients of the plain step (float64, dropout
on, so only an exact RNG replay can match), the loss's own parameters, inputs as mappings and tuples,
frozen towers, BatchNorm buffers, gradient accumulation, GradScaler, autocast, the generators' state
afterwards, errors, and peak memory flat in the batch size (fresh processes).
See tests/test_cached_distributed.py for gloo ranks and DDP."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import fastcl
import fastcl.cached
import sessions
from cached_cases import build, grads, max_difference, plain_step
from tolerances import assert_close, tol

LOSSES = ["clip", "siglip", "supcon"]
ROWS, CHUNK = 37, 8  # five chunks, the last one ragged


def cached_and_plain(loss, *, seed=5, chunk=CHUNK, dropout=0.3, **kwargs):
    """(cached loss, cached grads, plain loss, plain grads) of the same models and dropout draws."""
    results = []
    for cached in (True, False):
        setup = build(loss, ROWS, dropout=dropout)
        torch.manual_seed(seed)
        if cached:
            value = fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=chunk, **kwargs)
        else:
            value = plain_step(setup, chunk)
        results += [value, grads(setup)]
    return results


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients_equal_the_plain_step_with_dropout(loss):
    value, got, plain_value, want = cached_and_plain(loss)
    assert not value.requires_grad
    assert_close(value, plain_value, tol("cached loss"), f"{loss}: loss")
    assert_close(got, want, tol("cached gradients"), f"{loss}: gradients")  # the acceptance asks 1e-6
    # Dropout is really on: another draw moves the gradients far more than that.
    _, other, _, _ = cached_and_plain(loss, seed=6)
    assert max_difference(other, want) > 1e-3


def test_without_the_replay_the_gradients_would_be_wrong(monkeypatch):
    """The RNG replay is what makes them equal: re-forwarding with fresh dropout masks does not."""
    monkeypatch.setattr(fastcl.cached._RandomState, "replayed", lambda self: contextlib.nullcontext())
    _, got, _, want = cached_and_plain("clip")
    assert max_difference(got, want) > 1e-3


@pytest.mark.parametrize("chunk", [1, 36, 37, 1000])
def test_any_chunk_size(chunk):
    _, got, _, want = cached_and_plain("siglip", chunk=chunk)
    assert_close(got, want, tol("cached gradients"), f"chunk {chunk}")


def test_generators_end_where_the_plain_step_leaves_them():
    states = []
    for cached in (True, False):
        setup = build("clip", ROWS, dropout=0.3)
        torch.manual_seed(5)
        if cached:
            fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
        else:
            plain_step(setup, CHUNK)
        states.append(torch.get_rng_state())
    assert torch.equal(*states)


def test_gradients_add_to_existing_ones():
    setup = build("clip", ROWS, dropout=0.0)
    fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
    once = grads(setup)
    fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
    twice = grads(setup)
    assert_close(twice, {n: 2 * g for n, g in once.items()}, tol("cached accumulated"), "twice vs 2 x once")


def test_grad_scaler_scales_every_gradient():
    setup = build("siglip", ROWS, dropout=0.0)
    fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK)
    unscaled = grads(setup)
    for p in setup.params.values():
        p.grad = None
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    value = fastcl.cached_backward(setup.loss_fn, setup.encoders, setup.inputs, chunk_size=CHUNK, scaler=scaler)
    assert value.item() == pytest.approx(setup.loss_fn(*[e(i) for e, i in zip(setup.encoders, setup.inputs)]).item())
    assert_close(grads(setup), {n: 256 * g for n, g in unscaled.items()}, tol("cached scaled"),
                 "scaled vs 256 x unscaled")


def test_autocast_runs_both_passes_under_it():
    """Under CPU autocast (bfloat16) the loss sees bfloat16 embeddings and the gradients match the plain
    step's to bfloat16 precision. (Not bitwise: the plain step sums the chunks' weight gradients in
    bfloat16, through autocast's one cached bfloat16 copy of each weight; the cached step adds them
    to the float32 .grad one chunk at a time.)"""
    results, seen = [], []
    for cached in (True, False):
        torch.manual_seed(0)
        img, txt = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.Linear(16, 5)), nn.Linear(6, 5)
        scale = nn.Parameter(torch.tensor(2.0))
        x, y = torch.randn(20, 6), torch.randn(20, 6)

        def loss_fn(u, v, scale=scale):
            seen.append(u.dtype)
            return fastcl.clip_loss(u, v, scale.exp())

        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if cached:
                fastcl.cached_backward(loss_fn, [img, txt], [x, y], chunk_size=6)
            else:
                loss_fn(*[torch.cat([e(i[a:a + 6]) for a in range(0, 20, 6)]) for e, i in ((img, x), (txt, y))]
                        ).backward()
        results.append([p.grad for p in (*img.parameters(), *txt.parameters(), scale)])
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert_close(results[0], results[1], tol("cached autocast", torch.float32), "cached vs plain under autocast")


def test_mapping_and_tuple_inputs_are_split_and_unpacked():
    torch.manual_seed(0)
    net = nn.Linear(4, 3).double()

    class ByKeywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, ids, mask, scale=1.0):
            return self.net(ids * mask[:, None]) * scale

    enc = ByKeywords()
    ids, mask = torch.randn(11, 4, dtype=torch.float64), (torch.arange(11) % 3 > 0).double()
    kwargs_input = {"ids": ids, "mask": mask, "scale": 2.0}
    tuple_input = (ids, mask, torch.tensor(2.0, dtype=torch.float64))  # 0-d: passed whole to every chunk
    fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u, v, 1.5), [enc, enc], [kwargs_input, tuple_input],
                           chunk_size=4)
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    fastcl.clip_loss(enc(**kwargs_input), enc(*tuple_input), 1.5).backward()
    assert_close(got, [w.grad for w in net.parameters()], tol("regrouped"), "parameter gradients")


def test_frozen_tower_gets_no_gradient_and_no_second_pass():
    torch.manual_seed(0)
    trained, frozen = nn.Linear(6, 5).double(), nn.Linear(6, 5).double().requires_grad_(False)
    calls = []
    frozen.register_forward_hook(lambda *args: calls.append(1))
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.randn(10, 6, dtype=torch.float64)
    fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u, v, 2.0), [trained, frozen], [x, y], chunk_size=4)
    assert len(calls) == 3 and all(p.grad is None for p in frozen.parameters())
    got = trained.weight.grad.clone()
    trained.zero_grad()
    fastcl.clip_loss(trained(x), frozen(y), 2.0).backward()
    assert_close(got, trained.weight.grad, tol("regrouped"), "trained tower")


def test_batchnorm_statistics_are_updated_once_per_chunk():
    """The first pass leaves no trace in buffers: running statistics end as after one chunked forward."""
    states = []
    for cached in (True, False):
        torch.manual_seed(0)
        enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 5)).double()
        x, y = torch.randn(23, 6, dtype=torch.float64), torch.randn(23, 6, dtype=torch.float64)
        if cached:
            fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u, v, 2.0), [enc, enc], [x, y], chunk_size=8)
        else:
            chunks = [torch.cat([enc(t[a:a + 8]) for a in range(0, 23, 8)]) for t in (x, y)]
            fastcl.clip_loss(*chunks, 2.0).backward()
        bn = enc[1]
        states.append((bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone(),
                       enc[0].weight.grad.clone()))
    assert_close(states[0], states[1], tol("regrouped"), "running statistics and gradient")
    assert states[0][2].item() == 6


@pytest.mark.parametrize("encoders", ["modules", "lambdas", "batchnorm"])
def test_the_first_chunk_keeps_its_graph_where_that_is_safe(encoders):
    """The first tower's first chunk is embedded once: the second pass backpropagates the graph of
    the first. Not behind lambdas (their buffers cannot be watched), nor when a buffer changes in
    the first pass (BatchNorm: it is put back in place, under the graph that saved it); both embed
    every chunk twice, as before. Gradients equal the plain step's (dropout on: the draws line up)."""
    calls, results = [], []
    for cached in (True, False):
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(16) if encoders == "batchnorm" else nn.Identity()
        img = nn.Sequential(nn.Linear(6, 16), norm, nn.Dropout(0.3), nn.Linear(16, 5)).double()
        txt = nn.Sequential(nn.Linear(7, 16), nn.Dropout(0.3), nn.Linear(16, 5)).double()
        for t, enc in enumerate((img, txt)):
            enc.register_forward_hook(lambda *args, t=t, cached=cached: calls.append((cached, t)))
        x, y = torch.randn(23, 6, dtype=torch.float64), torch.randn(23, 7, dtype=torch.float64)
        towers = [img, txt] if encoders != "lambdas" else [lambda a, e=img: e(a), lambda a, e=txt: e(a)]
        torch.manual_seed(1)
        if cached:
            fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u, v, 2.0), towers, [x, y], chunk_size=8)
        else:
            fastcl.clip_loss(*[torch.cat([e(i[a:a + 8]) for a in range(0, 23, 8)]) for e, i in ((img, x), (txt, y))],
                             2.0).backward()
        results.append([p.grad for p in (*img.parameters(), *txt.parameters())] + list(img.buffers()))
    first = calls.count((True, 0))
    assert (first, calls.count((True, 1)), calls.count((False, 0))) == (5 if encoders == "modules" else 6, 6, 3)
    assert_close(results[0], results[1], tol("regrouped"), f"{encoders}: gradients and buffers")


def test_bad_arguments_raise_errors_that_name_them():
    enc, x = nn.Linear(3, 2), torch.randn(5, 3)

    def loss(u, v):
        return fastcl.clip_loss(u, v, 1.0)

    with pytest.raises(ValueError, match="encoders has 2 entries but inputs has 1"):
        fastcl.cached_backward(loss, [enc, enc], [x], chunk_size=2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        fastcl.cached_backward(loss, [enc, enc], [x, x], chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        fastcl.cached_backward(loss, [enc, enc], [x, x], chunk_size=2.0)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar \(0-d\) loss, got shape \(5,\)"):
        fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u, v, 1.0, reduction="none"), [enc, enc], [x, x],
                               chunk_size=2)
    with pytest.raises(TypeError, match="loss_fn must return a tensor"):
        fastcl.cached_backward(lambda u, v: 1.0, [enc, enc], [x, x], chunk_size=2)
    with pytest.raises(ValueError, match="does not require grad"):
        fastcl.cached_backward(lambda u, v: fastcl.clip_loss(u.detach(), v.detach(), 1.0), [enc, enc], [x, x],
                               chunk_size=2)
    with pytest.raises(ValueError, match=r"the tensors in inputs\[1\] have different numbers of rows \[4, 5\]"):
        fastcl.cached_backward(loss, [enc, lambda a, b: enc(a)], [x, (x, x[:4])], chunk_size=2)
    with pytest.raises(ValueError, match=r"inputs\[0\] has no rows"):
        fastcl.cached_backward(loss, [enc, enc], [x[:0], x[:0]], chunk_size=2)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a tensor"):
        fastcl.cached_backward(loss, [enc, enc], ["text", x], chunk_size=2)
    with pytest.raises(TypeError, match=r"encoders\[1\] must return a tensor"):
        fastcl.cached_backward(loss, [enc, lambda a: (enc(a),)], [x, x], chunk_size=2)
    with pytest.raises(ValueError, match=r"encoders\[0\] returned shape \(1, 2\) for a chunk of 2 rows"):
        fastcl.cached_backward(loss, [lambda a: enc(a).sum(0, keepdim=True), enc], [x, x], chunk_size=2)
    with pytest.raises(TypeError, match=r"encoders\[0\] must be callable"):
        fastcl.cached_backward(loss, [None, enc], [x, x], chunk_size=2)
    with pytest.raises(TypeError, match="encoders must be a sequence"):
        fastcl.cached_backward(loss, enc, [x, x], chunk_size=2)


# --- memory -------------------------------------------------------------------------------------

PROBE = """
    import sys, torch, fastcl
    from torch import nn
    mode, n, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.manual_seed(0)
    def tower():  # a wide hidden layer: per row, 2048-wide activations against a 16-wide embedding
        return nn.Sequential(nn.Linear(64, 2048), nn.GELU(), nn.Dropout(0.1), nn.Linear(2048, 16))
    img, txt = tower(), tower()
    # an engine (O(N * D) memory): at these N "auto" would materialise S (what small batches get)
    loss_fn = lambda u, v: fastcl.clip_loss(u, v, 10.0, backend="cpu")
    def run(x, y):
        if mode == "cached":
            fastcl.cached_backward(loss_fn, [img, txt], [x, y], chunk_size=chunk)
        elif mode == "loss":
            fastcl.cached_loss(loss_fn, [img, txt], [x, y], chunk_size=chunk).backward()
        else:
            loss_fn(img(x), txt(y)).backward()
    run(torch.randn(64, 64), torch.randn(64, 64))  # warm-up: lazy initialisation is not the step's memory
    x, y = torch.randn(n, 64), torch.randn(n, 64)
    def step():
        run(x, y)
        return 0
"""


def _peak(mode: str, n: int, chunk: int = 64):
    # A fixed mmap threshold: glibc otherwise raises it after the first frees and serves later large
    # buffers from the heap, whose high-water mark then carries megabytes of allocator noise.
    return sessions.start_probe(PROBE, mode, n, chunk, env={"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})


def test_peak_memory_is_flat_in_the_batch_size_at_a_fixed_chunk():
    """Fresh processes (glibc keeps freed heap), run side by side. From N to 4N rows the cached step
    grows only by its O(N * D) embeddings (their gradients, the loss's O(N * D) work) and allocator
    noise; at 4N the plain step holds the activations of the whole batch (8 MiB per 2048-wide
    layer output), so the test can tell the two apart. The same for ``cached_loss(...).backward()``
    (the second pass inside the caller's backward)."""
    n = 256
    keys = [(mode, rows) for mode in ("cached", "loss") for rows in (n, 4 * n)] + [("plain", 4 * n)]
    procs = {key: _peak(*key) for key in keys}
    peak = {key: sessions.probe_result(proc) for key, proc in procs.items()}
    embedding_bytes = 2 * 3 * n * 16 * 4  # two towers, 3N more rows of 16 float32 values
    allowance = 16 * embedding_bytes + 8 * 2**20
    for mode in ("cached", "loss"):
        growth = peak[mode, 4 * n] - peak[mode, n]
        assert growth < allowance, f"{mode} grew {growth / 2**20:.1f} MiB from N={n} to {4 * n}: {peak}"
        assert peak["plain", 4 * n] - peak[mode, 4 * n] > 3 * allowance, f"activations should dominate: {peak}"
