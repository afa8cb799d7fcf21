"""A tiny two-tower CLIP trained with ``fastcl.nn.ClipLoss`` on synthetic paired data.

Each pair shares a hidden latent vector ``z``; the "image" and the "text" are two different fixed
random nonlinear functions of ``z`` plus noise. Two small MLP towers learn to embed both modalities
in one space, with a learnable temperature (``logit_scale``, exponentiated and clamped as in CLIP).
Retrieval on a held-out set (image -> text and text -> image, top-1 among all held-out pairs) goes
from chance to nearly perfect.

    python examples/clip_two_towers.py                      # about a minute on a quiet 2-core CPU machine
    OMP_NUM_THREADS=1 python examples/clip_two_towers.py    # on a busy machine (README, Quickstart)
    python examples/clip_two_towers.py --steps 60 --batch 128 --backend chunked
"""
import argparse
import math
import time

import torch
from torch import nn

import fastcl


class Modality:
    """A fixed random nonlinear view of the latent: ``tanh(z @ A) @ B + noise``."""

    def __init__(self, latent: int, width: int, gen: torch.Generator, noise: float):
        self.a = torch.randn(latent, 2 * width, generator=gen) / math.sqrt(latent)
        self.b = torch.randn(2 * width, width, generator=gen) / math.sqrt(2 * width)
        self.noise = noise

    def __call__(self, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = torch.tanh(3 * z @ self.a) @ self.b
        return x + self.noise * torch.randn(x.shape, generator=gen)


def tower(width: int, dim: int, hidden: int = 512) -> nn.Module:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, dim))


class TwoTowers(nn.Module):
    def __init__(self, image_width: int, text_width: int, dim: int):
        super().__init__()
        self.image, self.text = tower(image_width, dim), tower(text_width, dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, images, texts):
        img = nn.functional.normalize(self.image(images), dim=-1)
        txt = nn.functional.normalize(self.text(texts), dim=-1)
        return img, txt, self.logit_scale.exp()


@torch.no_grad()
def retrieval_top1(model: TwoTowers, images, texts) -> tuple[float, float]:
    """Top-1 accuracy of image -> text and text -> image retrieval among all the given pairs."""
    img, txt, _ = model(images, texts)
    sim = img @ txt.T  # fine to materialise for a small evaluation set
    target = torch.arange(len(sim))
    return (sim.argmax(1) == target).float().mean().item(), (sim.argmax(0) == target).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="optimiser steps")
    p.add_argument("--batch", type=int, default=1024, help="pairs per step")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the towers")
    p.add_argument("--backend", default="auto", help="fastcl backend: auto, reference, chunked, cpu, ...")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out pairs to retrieve among")
    p.add_argument("--log-every", type=int, default=50, help="steps between printed losses")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    latent = 32
    to_image = Modality(latent, 96, gen, noise=0.4)
    to_text = Modality(latent, 48, gen, noise=0.4)

    def pairs(n):
        z = torch.randn(n, latent, generator=gen)
        return to_image(z, gen), to_text(z, gen)

    held_out = pairs(args.eval_size)
    model = TwoTowers(96, 48, args.dim)
    criterion = fastcl.nn.ClipLoss(backend=args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    i2t, t2i = retrieval_top1(model, *held_out)
    print(f"start: i2t top1 {i2t:.3f}, t2i top1 {t2i:.3f} (chance {1 / args.eval_size:.3f})")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        img, txt, scale = model(*pairs(args.batch))  # fresh synthetic pairs every step
        loss = criterion(img, txt, scale)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: temperature never below 0.01
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  scale {scale.item():6.2f}  "
                  f"{time.perf_counter() - start:5.1f}s")

    i2t, t2i = retrieval_top1(model, *held_out)
    print(f"final: loss {loss.item():.4f}, i2t top1 {i2t:.3f}, t2i top1 {t2i:.3f}")


if __name__ == "__main__":
    main()
