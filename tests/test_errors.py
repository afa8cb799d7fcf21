"""Bad input raises ValueError/TypeError naming the argument; NaN/Inf input gives a NaN loss (SPEC.md).

Every case starts from a valid call of one public loss (``GOOD``) and changes one thing. The cases are
generated from small tables of what each loss takes: its 2-D feature arguments, the argument each
must agree with, its positive scalars and its labels.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastcl

D = 3


def feat(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


GOOD = {
    "clip_loss": lambda: dict(x=feat(4, D), y=feat(4, D), logit_scale=2.0),
    "infonce_loss": lambda: dict(query=feat(4, D), key=feat(4, D), temperature=0.1),
    "siglip_loss": lambda: dict(x=feat(4, D), y=feat(4, D), logit_scale=2.0, logit_bias=-1.0),
    "ntxent_loss": lambda: dict(views=feat(2, 4, D), temperature=0.5),
    "supcon_loss": lambda: dict(features=feat(6, D), labels=torch.tensor([0, 0, 1, 1, 2, 2]), temperature=0.1),
    "dcl_loss": lambda: dict(view0=feat(4, D), view1=feat(4, D), temperature=0.1),
    "mv_infonce_loss": lambda: dict(views=feat(3, 4, D), temperature=0.1),
    "mv_dhel_loss": lambda: dict(views=feat(3, 4, D), temperature=0.1),
    "cwcl_loss": lambda: dict(x=feat(4, D), y=feat(4, D), logit_scale=2.0, weight_features=feat(4, 5)),
    "mw_loss": lambda: dict(query=feat(4, D), key=feat(4, D), temperature=0.05),
    "uniformity_loss": lambda: dict(z=feat(5, D), t=2.0),
    "alignment_loss": lambda: dict(x=feat(4, D), y=feat(4, D), alpha=2.0),
}
LOSSES = list(GOOD)
VIEW_LOSSES = ["ntxent_loss", "mv_infonce_loss", "mv_dhel_loss"]
FEATURES = {  # the [rows, D] tensor arguments
    "clip_loss": ["x", "y"], "infonce_loss": ["query", "key"], "siglip_loss": ["x", "y"],
    "supcon_loss": ["features"], "dcl_loss": ["view0", "view1"], "cwcl_loss": ["x", "y", "weight_features"],
    "mw_loss": ["query", "key"], "uniformity_loss": ["z"], "alignment_loss": ["x", "y"],
}
PAIRED = {  # (first, second): same dtype, device, D and row count (row i pairs with row i)
    "clip_loss": ("x", "y"), "infonce_loss": ("query", "key"), "siglip_loss": ("x", "y"),
    "dcl_loss": ("view0", "view1"), "cwcl_loss": ("x", "y"), "mw_loss": ("query", "key"),
    "alignment_loss": ("x", "y"),
}
POSITIVE = {  # scalars that must be positive and finite
    "clip_loss": ["logit_scale"], "infonce_loss": ["temperature"], "siglip_loss": ["logit_scale"],
    "ntxent_loss": ["temperature"], "supcon_loss": ["temperature"], "dcl_loss": ["temperature", "sigma"],
    "mv_infonce_loss": ["temperature"], "mv_dhel_loss": ["temperature"], "cwcl_loss": ["logit_scale"],
    "mw_loss": ["temperature"], "uniformity_loss": ["t"], "alignment_loss": ["alpha"],
}
LEARNABLE = {  # the temperature or scale of each loss that has one: a number or a one-element tensor
    "clip_loss": "logit_scale", "infonce_loss": "temperature", "siglip_loss": "logit_scale",
    "ntxent_loss": "temperature", "supcon_loss": "temperature", "dcl_loss": "temperature",
    "mv_infonce_loss": "temperature", "mv_dhel_loss": "temperature", "cwcl_loss": "logit_scale",
    "mw_loss": "temperature", "uniformity_loss": "t",
}
TARGET_LABELS = {  # losses whose labels[i] is a target column of the second argument
    "clip_loss": dict(bidirectional=False), "infonce_loss": {}, "mw_loss": {},
}
TOO_FEW_ROWS = {  # the smallest batch below which a loss is undefined, and the argument named
    "dcl_loss": ("view0", lambda a: dict(view0=a["view0"][:1], view1=a["view1"][:1])),
    "mw_loss": ("key", lambda a: dict(query=a["query"][:1], key=a["key"][:1])),
    "uniformity_loss": ("z", lambda a: dict(z=a["z"][:1])),
    "mv_dhel_loss": ("views", lambda a: dict(views=a["views"][:, :1])),
}


def names(arg: str) -> str:
    """A regex matching ``arg`` as a whole word in the message."""
    return rf"(?<![\w.]){re.escape(arg)}(?!\w)"


def call(loss: str, changes=lambda a: {}):
    args = GOOD[loss]()
    args.update(changes(args))
    return getattr(fastcl, loss)(**args)


def case(loss, what, changes, exc, arg):
    return pytest.param(loss, changes, exc, arg, id=f"{loss}-{what}")


def feature_cases():
    for loss, args in FEATURES.items():
        for arg in args:
            yield case(loss, f"{arg}-rank1", lambda a, arg=arg: {arg: a[arg][0]}, ValueError, arg)
            yield case(loss, f"{arg}-rank4", lambda a, arg=arg: {arg: a[arg][None, None]}, ValueError, arg)
            yield case(loss, f"{arg}-no-rows", lambda a, arg=arg: {arg: a[arg][:0]}, ValueError, arg)
            yield case(loss, f"{arg}-no-columns", lambda a, arg=arg: {arg: a[arg][:, :0]}, ValueError, arg)
            yield case(loss, f"{arg}-integer", lambda a, arg=arg: {arg: a[arg].long()}, TypeError, arg)
            yield case(loss, f"{arg}-list", lambda a, arg=arg: {arg: a[arg].tolist()}, TypeError, arg)
        if loss not in ("supcon_loss", "uniformity_loss"):  # a [V, B, D] tensor is valid features there
            arg = args[0]
            yield case(loss, f"{arg}-rank3", lambda a, arg=arg: {arg: a[arg][None]}, ValueError, arg)


def paired_cases():
    for loss, (first, second) in PAIRED.items():
        yield case(loss, "D-mismatch", lambda a, s=second: {s: feat(a[s].shape[0], D + 1)}, ValueError, second)
        yield case(loss, "dtype-mismatch", lambda a, s=second: {s: a[s].double()}, TypeError, second)
        yield case(loss, "device-mismatch", lambda a, s=second: {s: a[s].to("meta")}, ValueError, second)
        yield case(loss, "M!=N", lambda a, s=second: {s: feat(a[s].shape[0] + 1, D)}, ValueError, second)
        yield case(loss, "N!=M", lambda a, f=first: {f: feat(a[f].shape[0] + 1, D)}, ValueError, first)
    yield case("clip_loss", "M!=N-one-direction", lambda a: dict(y=feat(5, D), bidirectional=False),
               ValueError, "y")
    yield case("cwcl_loss", "weight_features-rows", lambda a: dict(weight_features=feat(5, 5)),
               ValueError, "weight_features")
    yield case("cwcl_loss", "weight_features-device", lambda a: dict(weight_features=feat(4, 5, device="meta")),
               ValueError, "weight_features")
    yield case("supcon_loss", "features-3d-no-columns", lambda a: dict(features=feat(2, 3, D)[:, :, :0]),
               ValueError, "features")


def view_cases():
    for loss in VIEW_LOSSES:
        bad = {
            "rank2": (lambda a: dict(views=a["views"][0]), ValueError, "views"),
            "rank4": (lambda a: dict(views=a["views"][None]), ValueError, "views"),
            "empty-batch": (lambda a: dict(views=a["views"][:, :0]), ValueError, "views"),
            "one-view": (lambda a: dict(views=a["views"][:1]), ValueError, "views"),
            "one-view-list": (lambda a: dict(views=[a["views"][0]]), ValueError, "views"),
            "empty-list": (lambda a: dict(views=[]), ValueError, "views"),
            "integer": (lambda a: dict(views=a["views"].long()), TypeError, "views"),
            "not-a-tensor": (lambda a: dict(views="views"), TypeError, "views"),
            "list-rank1": (lambda a: dict(views=[a["views"][0], a["views"][1, 0]]), ValueError, "views[1]"),
            "list-D-mismatch": (lambda a: dict(views=[feat(4, D), feat(4, D + 1)]), ValueError, "views[1]"),
            "list-B-mismatch": (lambda a: dict(views=[feat(4, D), feat(5, D)]), ValueError, "views[1]"),
            "list-dtype-mismatch": (lambda a: dict(views=[feat(4, D), feat(4, D).double()]), TypeError, "views[1]"),
            "list-device-mismatch": (lambda a: dict(views=[feat(4, D), feat(4, D, device="meta")]),
                                     ValueError, "views[1]"),
        }
        for what, (changes, exc, arg) in bad.items():
            yield case(loss, what, changes, exc, arg)


def scalar_cases():
    for loss, args in POSITIVE.items():
        for arg in args:
            for value in (0.0, -1.0, float("nan"), float("inf")):
                yield case(loss, f"{arg}={value}", lambda a, arg=arg, v=value: {arg: v}, ValueError, arg)
            yield case(loss, f"{arg}-str", lambda a, arg=arg: {arg: "1"}, TypeError, arg)
    for arg in ("logit_scale", "logit_bias"):
        yield case("siglip_loss", f"{arg}-two-values", lambda a, arg=arg: {arg: torch.ones(2)}, ValueError, arg)
        yield case("siglip_loss", f"{arg}-device", lambda a, arg=arg: {arg: torch.ones((), device="meta")},
                   ValueError, arg)
    yield case("siglip_loss", "logit_bias=nan", lambda a: dict(logit_bias=float("nan")), ValueError, "logit_bias")
    yield case("siglip_loss", "logit_bias-str", lambda a: dict(logit_bias="0"), TypeError, "logit_bias")
    yield case("clip_loss", "logit_scale-int-tensor", lambda a: dict(logit_scale=torch.tensor(2)), TypeError,
               "logit_scale")
    yield case("cwcl_loss", "logit_scale-two-values", lambda a: dict(logit_scale=torch.ones(2)), ValueError,
               "logit_scale")
    for loss, arg in LEARNABLE.items():  # tensors are accepted: their dtype, size and device are checked
        yield case(loss, f"{arg}-int-tensor", lambda a, arg=arg: {arg: torch.tensor(2)}, TypeError, arg)
        yield case(loss, f"{arg}-two-values", lambda a, arg=arg: {arg: torch.ones(2)}, ValueError, arg)
        yield case(loss, f"{arg}-device", lambda a, arg=arg: {arg: torch.ones((), device="meta")}, ValueError, arg)
        yield case(loss, f"{arg}-bool", lambda a, arg=arg: {arg: True}, TypeError, arg)
        yield case(loss, f"{arg}-numpy-negative", lambda a, arg=arg: {arg: np.float32(-0.5)}, ValueError, arg)


def label_cases():
    for loss, extra in TARGET_LABELS.items():
        key = "y" if loss == "clip_loss" else "key"
        bad = {
            "labels-too-high": (lambda a, k=key: dict(labels=torch.tensor([0, 1, 2, a[k].shape[0]])), ValueError),
            "labels-negative": (lambda a: dict(labels=torch.tensor([0, -1, 2, 3])), ValueError),
            "labels-too-short": (lambda a: dict(labels=torch.tensor([0, 1, 2])), ValueError),
            "labels-too-long": (lambda a: dict(labels=torch.tensor([0, 1, 2, 3, 0])), ValueError),
            "labels-2d": (lambda a: dict(labels=torch.zeros(4, 1, dtype=torch.long)), ValueError),
            "labels-float": (lambda a: dict(labels=torch.zeros(4)), TypeError),
            "labels-bool": (lambda a: dict(labels=torch.zeros(4, dtype=torch.bool)), TypeError),
            "labels-list": (lambda a: dict(labels=[0, 1, 2, 3]), TypeError),
            "labels-device": (lambda a: dict(labels=torch.zeros(4, dtype=torch.long, device="meta")), ValueError),
        }
        for what, (changes, exc) in bad.items():
            yield case(loss, what, lambda a, c=changes, e=extra: {**e, **c(a)}, exc, "labels")
    supcon = {
        "labels-too-short": (lambda a: dict(labels=torch.tensor([0, 0, 1, 1, 2])), ValueError),
        "labels-float": (lambda a: dict(labels=torch.zeros(6)), TypeError),
        "labels-2d": (lambda a: dict(labels=torch.zeros(6, 1, dtype=torch.long)), ValueError),
        "labels-device": (lambda a: dict(labels=torch.zeros(6, dtype=torch.long, device="meta")), ValueError),
        "views-labels-per-row": (lambda a: dict(features=feat(2, 3, D)), ValueError),  # labels must be [B] = [3]
    }
    for what, (changes, exc) in supcon.items():
        yield case("supcon_loss", what, changes, exc, "labels")


def option_cases():
    for loss in LOSSES:
        yield case(loss, "backend-unknown", lambda a: dict(backend="fastest"), ValueError, "backend")
        yield case(loss, "backend-not-str", lambda a: dict(backend=1), TypeError, "backend")
        yield case(loss, "reduction-bad", lambda a: dict(reduction="avg"), ValueError, "reduction")
        yield case(loss, "reduction-None", lambda a: dict(reduction=None), ValueError, "reduction")
    # the log of a mean over pairs: no sum of per-row terms is the loss
    yield case("uniformity_loss", "reduction-sum", lambda a: dict(reduction="sum"), ValueError, "reduction")
    for value in (-0.1, 1.5, float("nan")):
        yield case("clip_loss", f"label_smoothing={value}", lambda a, v=value: dict(label_smoothing=v),
                   ValueError, "label_smoothing")
    yield case("clip_loss", "bidirectional-with-labels", lambda a: dict(labels=torch.arange(4)), ValueError,
               "bidirectional")
    yield case("clip_loss", "bidirectional-with-extra_negatives", lambda a: dict(extra_negatives=feat(3, D)),
               ValueError, "bidirectional")
    yield case("dcl_loss", "weighting-unknown", lambda a: dict(weighting="vmf2"), ValueError, "weighting")
    for loss, (arg, changes) in TOO_FEW_ROWS.items():
        yield case(loss, "too-few-rows", changes, ValueError, arg)
    for loss, extra in (("clip_loss", dict(bidirectional=False)), ("infonce_loss", {})):
        bad = {
            "rank1": (lambda a: feat(D), ValueError),
            "no-rows": (lambda a: feat(0, D), ValueError),
            "D-mismatch": (lambda a: feat(3, D + 1), ValueError),
            "dtype-mismatch": (lambda a: feat(3, D).double(), TypeError),
            "device-mismatch": (lambda a: feat(3, D, device="meta"), ValueError),
        }
        for what, (negs, exc) in bad.items():
            yield case(loss, f"extra_negatives-{what}", lambda a, n=negs, e=extra: {**e, "extra_negatives": n(a)},
                       exc, "extra_negatives")


CASES = [*feature_cases(), *paired_cases(), *view_cases(), *scalar_cases(), *label_cases(), *option_cases()]


@pytest.mark.parametrize("loss,changes,exc,arg", CASES)
def test_bad_input_raises_naming_the_argument(loss, changes, exc, arg):
    with pytest.raises(exc, match=names(arg)):
        call(loss, changes)


@pytest.mark.parametrize("shape", [(4, D), (1, 2, 4, D)], ids=["one-view-2d", "rank4"])
@pytest.mark.parametrize("loss", VIEW_LOSSES)
def test_views_of_the_wrong_rank_name_both_accepted_forms(loss, shape):
    """A lone [B, D] tensor is the usual slip (one view where a list was meant): the message names the
    3-D tensor and the list of 2-D views, both of which the loss takes."""
    with pytest.raises(ValueError) as err:
        call(loss, lambda a: dict(views=feat(*shape)))
    message = str(err.value)
    assert "3-D tensor [V, B, D]" in message and "list/tuple of V tensors [B, D]" in message, message
    assert str(tuple(shape)) in message, message


@pytest.mark.parametrize("loss", LOSSES)
def test_good_calls_are_valid(loss):
    """The starting points of the cases above run and give a finite number."""
    out = call(loss)
    assert out.dim() == 0 and torch.isfinite(out)


UNAVAILABLE = [b for b in ("cpu", "triton", "cuda") if b not in fastcl.backends("cpu")]
MISSING = {"cpu": "CPU", "triton": "Triton", "cuda": "CUDA"}  # capitalised: the reason, not the echoed name


@pytest.mark.parametrize("backend", UNAVAILABLE)
@pytest.mark.parametrize("loss", LOSSES)
def test_unavailable_backend_raises_naming_what_is_missing(loss, backend):
    with pytest.raises(fastcl.BackendUnavailableError, match=MISSING[backend]) as err:
        call(loss, lambda a: dict(backend=backend))
    assert repr(backend) in str(err.value)


NONFINITE_TARGETS = [  # (loss, argument, index of the poisoned element)
    *[(loss, arg, (0, 0)) for loss, args in FEATURES.items() for arg in args],
    *[(loss, "views", (1, 2, 0)) for loss in VIEW_LOSSES],
]
EXTRA_NONFINITE = {  # poisoned inputs that are not in the good call
    "infonce_loss-extra_negatives": ("infonce_loss", lambda a, v: dict(extra_negatives=feat(3, D).index_fill(
        0, torch.tensor([1]), v))),
    "clip_loss-logit_scale-tensor": ("clip_loss", lambda a, v: dict(logit_scale=torch.tensor(v))),
    "siglip_loss-logit_bias-tensor": ("siglip_loss", lambda a, v: dict(logit_bias=torch.tensor(v))),
    "supcon_loss-views": ("supcon_loss", lambda a, v: dict(features=feat(2, 3, D).index_fill(
        1, torch.tensor([2]), v), labels=torch.tensor([0, 1, 0]))),
    # a tensor temperature is not range-checked, but inf (1 / inf = 0 would be a finite scale) and NaN
    # still give NaN
    **{f"{loss}-{arg}-tensor": (loss, lambda a, v, arg=arg: {arg: torch.tensor(v)})
       for loss, arg in LEARNABLE.items() if arg != "logit_scale"},
}
NONFINITE = [float("nan"), float("inf"), float("-inf")]


def poisoned(arg, index, value):
    def changes(a):
        bad = a[arg].clone()
        bad[index] = value
        return {arg: bad}
    return changes


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("loss,arg,index", NONFINITE_TARGETS)
def test_nonfinite_input_gives_nan_loss(loss, arg, index, value, backend):
    out = call(loss, lambda a: {**poisoned(arg, index, value)(a), "backend": backend})
    assert out.dim() == 0 and torch.isnan(out)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("value", NONFINITE)
@pytest.mark.parametrize("target", list(EXTRA_NONFINITE))
def test_nonfinite_extra_input_gives_nan_loss(target, value, backend):
    loss, changes = EXTRA_NONFINITE[target]
    out = call(loss, lambda a: {**changes(a, value), "backend": backend})
    assert out.dim() == 0 and torch.isnan(out)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("loss", ["clip_loss", "siglip_loss", "supcon_loss", "mw_loss", "alignment_loss",
                                  "uniformity_loss"])
def test_nonfinite_input_gives_nan_per_row_under_reduction_none(loss, backend):
    first = FEATURES[loss][0]
    out = call(loss, lambda a: {**poisoned(first, (0, 0), float("nan"))(a), "reduction": "none",
                                "backend": backend})
    assert out.dim() == 1 and torch.isnan(out).any()
