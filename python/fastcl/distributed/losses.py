"""Every loss of fastcl over the global batch of a process group: the single-process composition
(``fastcl.losses``) run in the group's world instead of the world of one.

Rank ``r`` of ``W`` passes its local rows; the global batch is the concatenation of all ranks'
inputs in rank order (multi-view ``[V, B, D]``: along ``B``). Each loss's composition says what its
arguments mean over a group (``labels`` are global indices, ...). Reductions, chosen so that the
mean over ranks of the returned values equals the single-process loss and, once DDP averages the
gradients, the gradients equal the single-process ones:
- ``mean``: the mean over this rank's anchors of their global-batch terms (SupCon: ``W`` times the
  sum of this rank's terms over the global count of anchors with a positive; uniformity: the
  global value on every rank);
- ``sum``: ``W`` times the sum of this rank's terms (so the mean over ranks is the global sum);
- ``none``: this rank's rows of the single-process output (NT-Xent: ``[V * B_local]`` view-major
  over the local samples); these concatenate to the global output, gradients are not rescaled.
Feature gradients on each rank are therefore ``W`` times the single-process ones under
``mean``/``sum`` (DDP divides by ``W``); gradients of replicated scalars (``logit_scale``,
``logit_bias``, a tensor ``temperature`` or uniformity's ``t``) average over ranks to the
single-process ones, which is what DDP does with a parameter's gradients (``none``: they sum).

The entry points are made here from the single-process ones (``over_group``): the same signature
and defaults, read from ``fastcl.<loss>``, then ``group``, ``strategy`` and ``node_size``; the call
binds the arguments to that signature and runs the loss's composition (``fastcl.losses.COMPOSITIONS``)
in a ``GroupWorld``. A composition that no longer takes its loss's arguments fails at import.
"""
from __future__ import annotations

import inspect

from .. import losses as single
from .world import GroupWorld

# What a distributed entry point takes beyond the single-process loss (all keyword-only).
GROUP_PARAMETERS = (
    inspect.Parameter("group", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("strategy", inspect.Parameter.KEYWORD_ONLY, default="allgather", annotation="str"),
    inspect.Parameter("node_size", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"),
)


def over_group(name: str):
    """``fastcl.<name>`` over a process group: its signature plus ``GROUP_PARAMETERS``; a call binds the
    loss's arguments to its single-process signature (defaults applied) and runs its composition in
    the group's world."""
    loss, composition = getattr(single, name), single.COMPOSITIONS[name]
    signature = inspect.signature(loss)
    _check_takes(composition, signature, name)

    def entry(*args, **kwargs):
        options = {p.name: kwargs.pop(p.name, p.default) for p in GROUP_PARAMETERS}
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        world = GroupWorld(options["group"], options["strategy"], node_size=options["node_size"])
        return composition(world, *bound.args, **bound.kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__signature__ = signature.replace(parameters=[*signature.parameters.values(), *GROUP_PARAMETERS])
    entry.__doc__ = (f"``fastcl.{name}`` over the global batch of the process group ``group`` (default: the default "
                     "group); ``strategy`` and ``node_size``: see ``fastcl.distributed``.\n\n"
                     f"``fastcl.{name}``:\n\n{inspect.getdoc(loss)}")
    return entry


def _check_takes(composition, signature: inspect.Signature, name: str) -> None:
    """``composition(world, *positional, **keywords)`` with ``name``'s parameters binds, or TypeError."""
    params = signature.parameters.values()
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keywords = [p.name for p in params if p.kind is p.KEYWORD_ONLY]
    try:
        inspect.signature(composition).bind("world", *positional, **dict.fromkeys(keywords))
    except TypeError as e:
        raise TypeError(f"fastcl.losses.COMPOSITIONS[{name!r}] ({composition.__qualname__}) does not take "
                        f"{name}'s arguments {[*positional, *keywords]}: {e}") from None


__all__ = list(single.__all__)
globals().update({_name: over_group(_name) for _name in __all__})
