"""A training step whose batch is larger than activation memory: GradCache for any fastcl loss.

    loss = fastcl.cached_backward(
        lambda img, txt: fastcl.clip_loss(img, txt, model.logit_scale.exp()),
        [model.visual, model.text], [images, texts], chunk_size=256)
    optimizer.step()

A contrastive loss couples every sample with every other, so the batch cannot be cut into
micro-batches whose losses add up. But the loss only needs the embeddings, ``O(N * D)``; the
encoders' activations are what does not fit. So (Gao et al., "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup", 2021):

1. embed every chunk of every tower without a graph, saving the RNG state before each chunk
   (the very first chunk keeps its graph: see ``_Step``);
2. run the loss on the whole embeddings (as leaves) and take its gradient with respect to them
   (and to the loss's own parameters, e.g. a learnable ``logit_scale``);
3. per chunk: restore its RNG state, embed it again with a graph and backpropagate its slice of
   the cached gradient. Dropout and random augmentations inside the model draw the same numbers,
   so the parameter gradients are those of the plain step, to float round-off.

Cost: one extra forward pass of the encoders, less one chunk (the first pass, without a graph,
but for its first chunk). Memory: the activations of one chunk, plus the embeddings and their
gradient.

``cached_loss`` is the same step for a trainer that calls ``loss.backward()`` itself: it runs 1. and
the loss, and returns a loss whose backward runs the rest (2. with the gradient the loss receives).
"""
from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Callable, Mapping, Sequence

import torch

Inputs = object  # a tensor, or a mapping / tuple / list of them (split along dim 0)


def cached_backward(
    loss_fn: Callable[..., torch.Tensor],
    encoders: Sequence[Callable],
    inputs: Sequence[Inputs],
    *,
    chunk_size: int,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    r"""Accumulate exactly the parameter gradients of
    ``loss_fn(*[enc(inp) for enc, inp in zip(encoders, inputs)]).backward()``, holding the
    activations of one chunk of ``chunk_size`` rows at a time; return the loss, detached.

    Args:
        loss_fn: ``loss_fn(*embeddings) -> 0-d tensor``, one embedding per encoder, rows in input order
            (any fastcl loss; close over labels, ``logit_scale``, ``logit_bias``). Parameters it uses
            get their gradients too. With ``fastcl.distributed`` losses each rank passes only its own
            shard: it embeds its rows and the loss sees the global batch.
        encoders: one callable per tower (the same module twice for two views of one encoder). Each
            maps a chunk of its input to a tensor ``[rows, ...]``. ``torch.nn.parallel.DistributedDataParallel``
            encoders synchronise gradients once per step: every chunk but the module's last runs under
            ``no_sync()``. A DDP module hidden inside a lambda or another module syncs on every chunk: the
            encoders' gradients are still the plain step's, slower. A parameter of ``loss_fn`` that such a
            module owns cannot join a chunk's backward: a ``RuntimeError`` says so (pass the DDP module
            itself, or keep the loss's parameters outside it).
        inputs: one per encoder: a tensor, or a mapping (called as ``enc(**chunk)``) or tuple/list
            (``enc(*chunk)``) of tensors, split along dim 0 (other values and 0-d tensors are passed to
            every chunk as they are).
        chunk_size: rows per chunk, ``>= 1``.
        scaler: a ``torch.amp.GradScaler``: gradients are those of ``scaler.scale(loss)`` (then call
            ``scaler.step(optimizer)`` as usual).

    Gradients add to existing ``.grad`` (gradient accumulation works on top: call it once per
    accumulation step, wrapped in ``ddp.no_sync()`` but the last one under DDP, as with ``backward``).

    Randomness: the default generators (torch's CPU one, every initialised CUDA device's, Python's
    ``random``, NumPy's global one) are saved before each chunk's first pass and restored before
    its second, so dropout and random augmentations inside the encoders draw the same numbers
    twice; afterwards they stand where the first pass and the loss left them, as after the plain
    step. A ``torch.Generator`` an encoder holds itself is not replayed: draw from the default ones.

    Buffers: every buffer of the encoders that are modules is restored after the first pass, so
    BatchNorm's running statistics are updated once per chunk, as by a plain chunked forward (in
    training mode BatchNorm normalises each chunk by its own statistics, as in any chunked forward).

    Autocast: call it inside ``torch.autocast(...)``; both passes and the loss run under it.
    """
    _check(loss_fn, encoders, inputs, chunk_size, scaler)
    step = _Step(loss_fn, encoders, inputs, chunk_size)
    value = step.loss.detach()
    step.backward(scaler=scaler)
    return value


def cached_loss(
    loss_fn: Callable[..., torch.Tensor],
    encoders: Sequence[Callable],
    inputs: Sequence[Inputs],
    *,
    chunk_size: int,
) -> torch.Tensor:
    r"""``cached_backward`` for a loop or trainer that calls ``loss.backward()`` itself (the HF
    ``Trainer``, Lightning's automatic optimisation, sentence-transformers' trainer): return the loss
    of the step, requiring grad, and run the second pass when it is backpropagated.

        def compute_loss(model, batch):
            return fastcl.cached_loss(lambda q, d: fastcl.infonce_loss(q, d, 0.05),
                                      [model.query, model.doc], [batch["q"], batch["d"]], chunk_size=64)

        compute_loss(model, batch).backward()   # or scaler.scale(loss).backward(), (loss / k).backward()

    Now: the first pass (every chunk embedded without a graph) and ``loss_fn`` on the embeddings.
    On ``backward``: the loss's gradient with respect to the embeddings and the loss's own parameters
    (through the returned loss's own gradient, so a GradScaler's scale or a trainer's division by the
    accumulation steps reaches every parameter as in the plain step), then each chunk re-embedded
    with its RNG state replayed, under the autocast state of the first pass (backward usually runs
    outside ``torch.autocast``), and backpropagated. The arguments, the gradients (added to ``.grad``,
    equal to those of ``loss_fn(*[enc(inp) ...]).backward()``), the RNG replay, the buffers and the
    DDP synchronisation are ``cached_backward``'s; the generators stand after ``backward`` where they
    stood before it, and after this call where the plain forward leaves them.

    The loss can be backpropagated once, with ``.backward()`` (not ``create_graph=True``, not
    ``torch.autograd.grad``); it may be added to other losses first. Until then it holds the
    embeddings and the loss's graph, ``O(N * D)``; the inputs are held until the backward.

    Under ``torch.no_grad()`` (a trainer's evaluation) there is nothing to backpropagate: the chunks
    are embedded once, buffers update as in a plain chunked forward, and the loss is returned as it is.
    """
    _check(loss_fn, encoders, inputs, chunk_size, None)
    if not torch.is_grad_enabled():
        towers = [_Tower(enc, inp, chunk_size, f"inputs[{t}]") for t, (enc, inp) in enumerate(zip(encoders, inputs))]
        for t, tower in enumerate(towers):
            tower.embed_without_graph(f"encoders[{t}]")
        loss = loss_fn(*[tower.embeddings for tower in towers])
        _check_loss(loss, needs_grad=False)
        return loss
    step = _Step(loss_fn, encoders, inputs, chunk_size)
    # A leaf of its own gives the returned loss a grad_fn: the loss's graph stays apart, so that its
    # gradient is taken in _Step.backward, once, and nothing else reaches the parameters.
    anchor = torch.empty(0, device=step.loss.device, requires_grad=True)
    return _BackwardRunsTheStep.apply(anchor, step)


class _BackwardRunsTheStep(torch.autograd.Function):
    """The returned loss: its value is the step's loss; its backward is the step's backward, with the
    gradient that reaches the loss (a GradScaler's scale, 1 / accumulation steps, a weight)."""

    @staticmethod
    def forward(ctx, anchor, step):
        ctx.step = step
        return step.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            raise RuntimeError("fastcl.cached_loss: backward with create_graph=True is not supported: the second "
                               "pass accumulates the parameters' gradients chunk by chunk, without a graph of them")
        ctx.step.backward(grad_output)
        return None, None


# --- the step -----------------------------------------------------------------------------------

class _Step:
    """One cached step: the first pass and the loss on its embeddings (at construction), then the
    loss's gradient and the second pass (``backward``, once). ``cached_backward`` runs both at once;
    ``cached_loss`` runs ``backward`` when the caller backpropagates through the loss it returned.

    The first tower's first chunk is embedded with a graph, which the second pass backpropagates
    without embedding that chunk again: one chunk's forward less per step, for no memory (its
    activations are what any re-embedded chunk holds; the second pass begins with it and frees
    them). It is the plain step's first forward, so its random draws come first there too. It is
    kept only where that is safe to see: every encoder is a module (so its buffers can be watched),
    and no buffer changed in the first pass (BatchNorm's running statistics would be put back in
    place under the graph, which may have saved them; the second pass then embeds it again, as
    every other chunk), and under DDP that chunk does not sync (a forward that syncs must be
    backpropagated, and a dropped graph would not be)."""

    def __init__(self, loss_fn, encoders, inputs, chunk_size: int):
        self.autocast = _Autocast()
        self.towers = [_Tower(enc, inp, chunk_size, f"inputs[{t}]") for t, (enc, inp) in
                       enumerate(zip(encoders, inputs))]
        self.sync = _DdpSync(encoders, self.towers)
        buffers = _BufferSnapshot(encoders)
        first = self.towers[0]
        if first.trainable and all(isinstance(e, torch.nn.Module) for e in encoders) and not self.sync.syncs(0, 0):
            with torch.enable_grad(), self.sync.context(0, 0):
                first.kept = first.embed(0, "encoders[0]")
        with torch.no_grad():
            for t, tower in enumerate(self.towers):
                tower.embed_without_graph(f"encoders[{t}]")
        if buffers.restore():  # written back in place, under a graph that may have saved them
            first.kept = None
        with torch.enable_grad():
            self.leaves = [tower.embeddings.requires_grad_(tower.trainable) for tower in self.towers]
            self.loss = loss_fn(*self.leaves)
        _check_loss(self.loss)

    def backward(self, grad_output: torch.Tensor | None = None, scaler=None) -> None:
        """Accumulate the parameter gradients of ``loss.backward(grad_output)`` (of
        ``scaler.scale(loss).backward()`` with a scaler); the generators end where they stood."""
        if self.loss is None:
            raise RuntimeError("fastcl.cached_loss: this loss was backpropagated already; its step's embeddings, "
                               "gradients and inputs are gone. Compute the loss again for another backward")
        here = _RandomState.capture()  # where the plain step's generators would stand after its backward
        with torch.enable_grad():
            loss, leaves = self.loss, self.leaves
            own = _loss_parameters(loss, leaves)
            wrt = [e for e in leaves if e.requires_grad] + own
            target = scaler.scale(loss) if scaler is not None else loss
            grads = torch.autograd.grad(target, wrt, grad_output, allow_unused=True)
            grads_of = {id(t): g for t, g in zip(wrt, grads)}
            sync = self.sync
            sync.join([(p, grads_of[id(p)]) for p in own if grads_of[id(p)] is not None])
            tower_grads = [grads_of.get(id(leaf)) if leaf.requires_grad else None for leaf in leaves]
            # The embeddings are not needed any more (the loss's graph, which holds them, goes too):
            # the second pass then holds only their gradients beside one chunk's activations.
            del loss, leaves, own, wrt, target, grads, grads_of
            self.loss = self.leaves = None
            for t, tower in enumerate(self.towers):
                tower.embeddings = None
                tower.backward_by_chunks(tower_grads[t], sync, t, self.autocast)
                tower_grads[t] = None
            sync.finish()
        self.towers = self.sync = None  # the chunks (views of the inputs), the first chunk's graph
        here.restore()


# --- the towers ---------------------------------------------------------------------------------

class _Tower:
    """One encoder and its input, cut into chunks; the embeddings of the first pass."""

    def __init__(self, encoder, inputs, chunk_size: int, name: str):
        self.encoder = encoder
        rows = _rows(inputs, name)
        self.bounds = [(a, min(a + chunk_size, rows)) for a in range(0, rows, chunk_size)]
        self.chunks = [_take(inputs, a, b) for a, b in self.bounds]
        self.states: list[_RandomState] = []  # one per chunk embedded so far
        self.embeddings: torch.Tensor | None = None
        self.kept: torch.Tensor | None = None  # the first chunk's embedding, with its graph (see _Step)
        # A module without trainable parameters (a frozen tower) needs no second pass.
        params = list(encoder.parameters()) if isinstance(encoder, torch.nn.Module) else None
        self.trainable = params is None or any(p.requires_grad for p in params)

    def embed_without_graph(self, name: str) -> None:
        """Embed the chunks not embedded yet (all, or all but a kept first one)."""
        for c in range(len(self.states), len(self.bounds)):
            self.embed(c, name)

    def embed(self, c: int, name: str) -> torch.Tensor:
        """Embed chunk ``c`` (the next one) into ``embeddings``; return its output."""
        (a, b), chunk = self.bounds[c], self.chunks[c]
        self.states.append(_RandomState.capture())
        out = _call(self.encoder, chunk)
        _check_output(out, b - a, name, None if self.embeddings is None else self.embeddings)
        if self.embeddings is None:  # one [N, ...] buffer: no list of chunks and no concatenation
            rows = self.bounds[-1][1]
            self.embeddings = out.new_empty((rows, *out.shape[1:]))
        with torch.no_grad():
            self.embeddings[a:b] = out
        return out

    def backward_by_chunks(self, grad: torch.Tensor | None, sync: _DdpSync, t: int, autocast: _Autocast) -> None:
        kept, self.kept = self.kept, None
        if grad is None:  # the loss does not depend on this tower (or it is frozen)
            return
        for c, ((a, b), chunk, state) in enumerate(zip(self.bounds, self.chunks, self.states)):
            if c == 0 and kept is not None:
                out, kept = kept, None
            else:
                with state.replayed(), sync.context(t, c), autocast.entered():
                    out = _call(self.encoder, chunk)
            if not out.requires_grad:  # no trainable parameter behind this encoder
                return
            extra = sync.joining(t, c)
            torch.autograd.backward([out, *(p for p, _ in extra)], [grad[a:b], *(g for _, g in extra)])


def _rows(inputs, name: str) -> int:
    sizes = {t.shape[0] for t in _tensors(inputs) if t.dim() > 0}
    if not sizes:
        raise TypeError(f"{name} must be a tensor, or a mapping / tuple / list holding tensors (split along dim 0), "
                        f"got {type(inputs).__name__}")
    if len(sizes) > 1:
        raise ValueError(f"the tensors in {name} have different numbers of rows {sorted(sizes)}; they are split "
                         "along dim 0 together")
    rows = sizes.pop()
    if rows == 0:
        raise ValueError(f"{name} has no rows")
    return rows


def _tensors(inputs):
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, tuple | list) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def _take(inputs, a: int, b: int):
    def cut(v):
        return v[a:b] if isinstance(v, torch.Tensor) and v.dim() > 0 else v

    if isinstance(inputs, torch.Tensor):
        return inputs[a:b]
    if isinstance(inputs, Mapping):
        return {key: cut(v) for key, v in inputs.items()}
    items = [cut(v) for v in inputs]
    return type(inputs)(*items) if hasattr(inputs, "_fields") else type(inputs)(items)  # namedtuples too


def _call(encoder, chunk):
    if isinstance(chunk, Mapping):
        return encoder(**chunk)
    if isinstance(chunk, tuple | list):
        return encoder(*chunk)
    return encoder(chunk)


# --- random state and buffers -------------------------------------------------------------------

class _RandomState:
    """The generators a model's randomness comes from: torch's CPU generator, every initialised
    CUDA device's, and Python's ``random`` (and NumPy's global one if NumPy is loaded)."""

    def __init__(self, cpu, cuda, python, numpy):
        self.cpu, self.cuda, self.python, self.numpy = cpu, cuda, python, numpy

    @classmethod
    def capture(cls) -> _RandomState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        np = sys.modules.get("numpy")
        return cls(torch.get_rng_state(), cuda, random.getstate(), None if np is None else np.random.get_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            sys.modules["numpy"].random.set_state(self.numpy)

    @contextlib.contextmanager
    def replayed(self):
        self.restore()
        yield


class _BufferSnapshot:
    """Copies of the encoders' buffers, put back after the first pass: that pass must leave no trace
    (BatchNorm would otherwise update its running statistics twice per chunk). Only changed buffers
    are written: a write bumps a tensor's version, which a graph that saved it would refuse. Changed
    is told by value: BatchNorm updates its running statistics without bumping their version."""

    def __init__(self, encoders):
        modules = {id(m): m for enc in encoders if isinstance(enc, torch.nn.Module) for m in enc.modules()}
        self.saved = [(m, name, buf, buf.clone()) for m in modules.values()
                      for name, buf in m._buffers.items() if buf is not None]

    def restore(self) -> bool:
        """Put back the buffers the first pass changed; whether there were any."""
        with torch.no_grad():
            changed = [entry for entry, same in zip(self.saved, self._unchanged()) if not same]
            for module, name, original, copy in changed:
                module._buffers[name] = original.copy_(copy)  # in place: DDP keeps references to buffers
        return bool(changed)

    def _unchanged(self) -> list[bool]:
        """Per saved buffer: still in place with its values (one device sync per device, not per buffer)."""
        same = [module._buffers.get(name) is original and original.shape == copy.shape
                for module, name, original, copy in self.saved]
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, original, _) in enumerate(self.saved):
            if same[i]:
                by_device.setdefault(original.device, []).append(i)
        for indices in by_device.values():
            differs = torch.stack([torch.ne(self.saved[i][2], self.saved[i][3]).any() for i in indices]).tolist()
            for i, d in zip(indices, differs):
                same[i] = not d
        return same


class _Autocast:
    """The autocast state the first pass ran under, for the second: ``cached_loss``'s backward usually
    runs outside the caller's ``torch.autocast`` (as a backward should), yet each chunk must be
    re-embedded in the dtypes of the first pass. Entering it changes nothing for ``cached_backward``,
    whose two passes run in the same context."""

    def __init__(self):
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.kwargs = [{"device_type": d, "enabled": torch.is_autocast_enabled(d),
                        "dtype": torch.get_autocast_dtype(d), "cache_enabled": torch.is_autocast_cache_enabled()}
                       for d in devices]

    @contextlib.contextmanager
    def entered(self):
        with contextlib.ExitStack() as stack:
            for kwargs in self.kwargs:
                stack.enter_context(torch.autocast(**kwargs))
            yield


# --- the loss's own parameters and DDP ----------------------------------------------------------

def _loss_parameters(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors other than the embeddings that the loss's graph reaches (a learnable
    ``logit_scale``, ``logit_bias``, a temperature), found by walking the graph: their gradients
    come from the same backward as the embeddings'."""
    mine = {id(e) for e in leaves}
    found, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None and id(variable) not in mine:
            found[id(variable)] = variable
        stack.extend(fn for fn, _ in node.next_functions)
    return list(found.values())


class _DdpSync:
    """When DistributedDataParallel all-reduces. Each DDP module syncs on the last chunk it embeds
    with a graph; every other such chunk of it (the first pass's kept chunk included) runs under
    ``no_sync()``: DDP decides at the forward whether the backward all-reduces, and then all-reduces
    the accumulated gradient once. A parameter of the loss (``logit_scale``) that belongs to a DDP
    module joins that backward (``join``), so DDP sees its gradient arrive and averages it like the
    plain step does; the loss's other parameters accumulate their gradients at once."""

    def __init__(self, encoders, towers):
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = [enc if isinstance(enc, DistributedDataParallel) else None for enc in encoders]
        self.last_use = {}  # id(DDP module) -> (tower, chunk) that syncs
        for t, (ddp, tower) in enumerate(zip(self.ddp, towers)):
            if ddp is not None and tower.trainable:
                self.last_use[id(ddp)] = (t, len(tower.bounds) - 1)
        self.pending = {key: [] for key in self.last_use}
        # DDP modules inside an encoder module (a trainer's wrapper): they sync on every chunk
        self.hidden = [(t, m) for t, enc in enumerate(encoders) if isinstance(enc, torch.nn.Module)
                       and not isinstance(enc, DistributedDataParallel)
                       for m in enc.modules() if isinstance(m, DistributedDataParallel)]

    def join(self, loss_grads) -> None:
        """The loss's parameters and their gradients: held for their DDP module's syncing chunk, or
        accumulated now."""
        for p, g in loss_grads:
            owner = next((key for key, _ in self.last_use.items()
                          if any(q is p for q in self._module(key).parameters())), None)
            hidden = next((t for t, m in self.hidden if any(q is p for q in m.parameters())), None)
            if owner is None and hidden is not None:
                raise RuntimeError(
                    f"a parameter of loss_fn {tuple(p.shape)} belongs to a DistributedDataParallel module inside "
                    f"encoders[{hidden}]: DDP expects its gradient in every chunk's backward, which the cached "
                    "step cannot give. Pass the DDP module itself as the encoder, or keep the loss's parameters "
                    "outside it")
            if owner is None:
                torch.autograd.backward([p], [g])
            else:
                self.pending[owner].append((p, g))

    def syncs(self, t: int, c: int) -> bool:
        ddp = self.ddp[t]
        return ddp is not None and self.last_use.get(id(ddp)) == (t, c)

    def _module(self, key):
        return next(d for d in self.ddp if d is not None and id(d) == key)

    def context(self, t: int, c: int):
        ddp = self.ddp[t]
        return contextlib.nullcontext() if ddp is None or self.syncs(t, c) else ddp.no_sync()

    def joining(self, t: int, c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.pending.pop(id(self.ddp[t]), []) if self.syncs(t, c) else []

    def finish(self) -> None:
        """Gradients still pending (their module's tower needed no backward) accumulate as they are."""
        for extra in self.pending.values():
            if extra:
                torch.autograd.backward([p for p, _ in extra], [g for _, g in extra])
        self.pending = {}


# --- checks -------------------------------------------------------------------------------------

def _check(loss_fn, encoders, inputs, chunk_size, scaler) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    for name, seq in (("encoders", encoders), ("inputs", inputs)):
        if not isinstance(seq, Sequence) or isinstance(seq, str | bytes):
            raise TypeError(f"{name} must be a sequence (list or tuple), one per tower, got {type(seq).__name__}")
    if len(encoders) != len(inputs):
        raise ValueError(f"encoders has {len(encoders)} entries but inputs has {len(inputs)}: one input per encoder")
    if not encoders:
        raise ValueError("encoders is empty: pass at least one encoder and its input")
    for t, enc in enumerate(encoders):
        if not callable(enc):
            raise TypeError(f"encoders[{t}] must be callable, got {type(enc).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if scaler is not None and not hasattr(scaler, "scale"):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")


def _check_output(out, rows: int, name: str, first: torch.Tensor | None) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a tensor [rows, ...], got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows:
        raise ValueError(f"{name} returned shape {tuple(out.shape)} for a chunk of {rows} rows; it must return "
                         "one embedding per input row")
    if first is not None and (out.shape[1:] != first.shape[1:] or out.dtype != first.dtype):
        raise ValueError(f"{name} returned {out.dtype} {tuple(out.shape[1:])} per row for one chunk and "
                         f"{first.dtype} {tuple(first.shape[1:])} for another")


def _check_loss(loss, needs_grad: bool = True) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar (0-d) loss, got shape {tuple(loss.shape)} "
                         "(use reduction='mean' or 'sum')")
    if needs_grad and not loss.requires_grad:
        raise ValueError("loss_fn's result does not require grad: it must be computed from the embeddings it is "
                         "given (or from parameters that require grad)")
