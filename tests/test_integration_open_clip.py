"""fastcl.integrations.open_clip.install() against a stand-in ``open_clip`` that binds the loss names
where open_clip does, in the test environment itself (open_clip runs in an environment of its own,
tests/test_open_clip_train.py, which trains with open_clip_train's main; this file also covers the
main branch's task path, which no release has yet):

- ``open_clip/factory.py`` (v3.3.0, ``create_loss``): ``from .loss import ClipLoss, ...`` at import,
  the class chosen by ``args.distill`` / ``args.siglip``; ``open_clip_train/main.py`` does
  ``from open_clip import create_loss`` and calls ``create_loss(args)``;
- ``open_clip/task/clip_task.py`` (main branch, after 3.3.0): ``CLIPTask`` imports ``ClipLoss`` from
  ``open_clip.loss`` when it is built, and calls ``self.loss(**model_out, output_dict=True)``;
- ``open_clip/__init__.py`` exports ``ClipLoss`` (not ``SigLipLoss``).
The stand-in ``ClipLoss`` computes open_clip's single-process loss (``logit_scale * x @ y.T`` both
ways, cross-entropy each, averaged), so the installed loss is compared with the one it replaces.
"""
from __future__ import annotations

import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

import fastcl
from fastcl.integrations import open_clip as integration
from tolerances import assert_close, tol

STAND_IN = {
    "open_clip/__init__.py": """
        from .factory import create_loss
        from .loss import ClipLoss, DistillClipLoss
    """,
    "open_clip/loss.py": """
        import torch
        import torch.nn.functional as F


        class ClipLoss(torch.nn.Module):
            def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                         use_horovod=False):
                super().__init__()

            def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
                labels = torch.arange(image_features.shape[0])
                logits_per_image = logit_scale * image_features @ text_features.T
                logits_per_text = logit_scale * text_features @ image_features.T
                loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
                return {"contrastive_loss": loss} if output_dict else loss


        class SigLipLoss(torch.nn.Module):
            def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None):
                super().__init__()


        class DistillClipLoss(ClipLoss):
            pass
    """,
    "open_clip/factory.py": """
        from .loss import ClipLoss, DistillClipLoss, SigLipLoss


        def create_loss(args):
            if args.distill:
                return DistillClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad,
                                       rank=args.rank, world_size=args.world_size)
            elif args.siglip:
                return SigLipLoss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
            return ClipLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, rank=args.rank,
                            world_size=args.world_size)
    """,
    "open_clip/task.py": """
        class CLIPTask:
            def __init__(self, model, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
                from open_clip.loss import ClipLoss
                self.model = model
                self.loss = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                                     world_size=world_size)
    """,
}


@pytest.fixture
def open_clip(tmp_path, monkeypatch):
    for rel, text in STAND_IN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(textwrap.dedent(text))
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    import open_clip

    yield open_clip
    integration.uninstall()
    for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
        del sys.modules[name]


def args(**overrides):
    base = dict(distill=False, siglip=False, local_loss=False, gather_with_grad=False, rank=0, world_size=1,
                loss_dist_impl=None, model="ViT-B-32")
    return SimpleNamespace(**{**base, **overrides})


def features(seed=0, n=6, d=5):
    g = torch.Generator().manual_seed(seed)
    x, y = (torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1) for _ in "xy")
    return x, y, torch.tensor(10.0, dtype=torch.float64)


def test_patching_open_clip_loss_alone_does_not_reach_create_loss(open_clip):
    from open_clip import create_loss  # as open_clip_train/main.py binds it, at its import

    original = open_clip.loss.ClipLoss
    open_clip.loss.ClipLoss = fastcl.nn.ClipLoss  # the observation: the factory bound the name already
    assert type(create_loss(args())) is original
    open_clip.loss.ClipLoss = original


def test_install_makes_create_loss_build_fastcls_losses(open_clip):
    from open_clip import create_loss

    original_clip = open_clip.loss.ClipLoss
    replaced = integration.install()
    assert set(replaced) == {"open_clip.factory.ClipLoss", "open_clip.factory.SigLipLoss", "open_clip.loss.ClipLoss",
                             "open_clip.loss.SigLipLoss", "open_clip.ClipLoss"}
    assert type(create_loss(args())) is integration.ClipLoss
    assert type(create_loss(args(siglip=True))) is integration.SigLipLoss
    assert type(create_loss(args(distill=True))) is open_clip.loss.DistillClipLoss  # open_clip's own
    from open_clip.task import CLIPTask  # the main branch's path: the name is read when the task is built

    assert type(CLIPTask(model=None).loss) is integration.ClipLoss
    x, y, scale = features()
    ours = create_loss(args())(x, y, scale, output_dict=True)
    theirs = original_clip()(x, y, scale, output_dict=True)
    assert_close(ours["contrastive_loss"], theirs["contrastive_loss"], tol("peer"), "installed ClipLoss vs open_clip's")


def test_installed_loss_is_float32_under_autocast_as_open_clips(open_clip):
    original_clip = open_clip.loss.ClipLoss
    integration.install()
    x, y, _ = features()
    x, y, scale = x.bfloat16(), y.bfloat16(), torch.tensor(10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = open_clip.create_loss(args())(x, y, scale, output_dict=True)["contrastive_loss"]
        theirs = original_clip()(x, y, scale)
    assert ours.dtype == theirs.dtype == torch.float32


def test_ring_when_the_loss_is_local_and_gradients_travel(open_clip):
    integration.install(backend="chunked")
    ring = integration.ClipLoss(local_loss=True, gather_with_grad=True, rank=0, world_size=2)
    assert (ring.strategy, ring.backend) == ("ring", "chunked")
    for kwargs in ({"local_loss": True}, {"gather_with_grad": True}, {}):
        assert integration.ClipLoss(**kwargs, world_size=2).strategy == "allgather"
    assert integration.SigLipLoss(world_size=2).strategy == "ring"


def test_install_is_idempotent_and_uninstall_restores(open_clip):
    original = open_clip.factory.ClipLoss
    integration.install()
    integration.install()
    assert integration.installed()
    integration.uninstall()
    assert not integration.installed()
    assert open_clip.factory.ClipLoss is original and open_clip.loss.ClipLoss is original
    assert open_clip.ClipLoss is original
