"""SimCLR-style self-supervised learning with V views per sample and ``fastcl.mv_dhel_loss``.

Synthetic data with class structure: each sample is a nonlinear function of its class centre plus
a small per-sample deviation, buried under a large "style" component along fixed nuisance
directions. The augmentation (which, as in SimCLR, encodes what should not matter) re-draws the
style, masks some features and adds noise, producing V views of each sample. An MLP encoder
trained with MV-DHEL (no labels) learns to ignore the style: a k-nearest-neighbour classifier on
its embeddings goes from about 0.4 (chance: 0.1) to above 0.9.

    python examples/multiview_dhel.py                       # about a minute on a quiet 2-core CPU machine
    OMP_NUM_THREADS=1 python examples/multiview_dhel.py     # on a busy machine (README, Quickstart)
    python examples/multiview_dhel.py --steps 60 --batch 128 --views 3
"""
import argparse
import math
import time

import torch
from torch import nn

import fastcl


class Dataset:
    """``x = tanh(content @ A) @ B + style @ N``: labels live in ``content``, ``style`` is a nuisance."""

    def __init__(self, classes: int, width: int, gen: torch.Generator, latent: int = 16, nuisance: int = 16):
        self.centres = torch.randn(classes, latent, generator=gen)
        self.a = torch.randn(latent, 2 * width, generator=gen) / math.sqrt(latent)
        self.b = torch.randn(2 * width, width, generator=gen) / math.sqrt(2 * width)
        self.style_dirs = torch.randn(nuisance, width, generator=gen) / math.sqrt(nuisance)
        self.gen = gen

    def style(self, n: int) -> torch.Tensor:
        return 2.0 * torch.randn(n, self.style_dirs.shape[0], generator=self.gen) @ self.style_dirs

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(self.centres), (n,), generator=self.gen)
        content = self.centres[labels] + 0.5 * torch.randn(n, self.centres.shape[1], generator=self.gen)
        return torch.tanh(content @ self.a) @ self.b + self.style(n), labels

    def augment(self, x: torch.Tensor, views: int) -> torch.Tensor:
        """``[V, B, width]``: new style, 10% of the features dropped, Gaussian noise."""
        out = []
        for _ in range(views):
            keep = (torch.rand(x.shape, generator=self.gen) > 0.1).float()
            out.append((x + self.style(len(x))) * keep + 0.1 * torch.randn(x.shape, generator=self.gen))
        return torch.stack(out)


@torch.no_grad()
def knn_accuracy(encoder: nn.Module, bank, queries, k: int = 10) -> float:
    """Majority vote among the ``k`` nearest bank samples (cosine similarity of embeddings)."""
    (xb, yb), (xq, yq) = bank, queries
    eb = nn.functional.normalize(encoder(xb), dim=-1)
    eq = nn.functional.normalize(encoder(xq), dim=-1)
    nearest = (eq @ eb.T).topk(k, dim=1).indices
    votes = torch.nn.functional.one_hot(yb[nearest], int(yb.max()) + 1).sum(1)
    return (votes.argmax(1) == yq).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--batch", type=int, default=1024, help="samples per step (each seen in every view)")
    p.add_argument("--views", type=int, default=4, help="augmented views per sample (V)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--temperature", type=float, default=0.2, help="MV-DHEL temperature")
    p.add_argument("--seed", type=int, default=0, help="seeds the data and the encoder")
    p.add_argument("--backend", default="auto", help="fastcl backend: auto, reference, chunked, cpu, ...")
    p.add_argument("--log-every", type=int, default=50, help="steps between printed losses")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    classes, width = 10, 64
    data = Dataset(classes, width, gen)
    bank, queries = data.sample(2000), data.sample(1000)  # labelled only for the kNN evaluation
    encoder = nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(),
                            nn.Linear(512, args.dim))
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-3)

    print(f"start: knn top1 {knn_accuracy(encoder, bank, queries):.3f} (chance {1 / classes:.3f})")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, _ = data.sample(args.batch)  # labels unused: self-supervised
        views = data.augment(x, args.views)  # [V, B, width]
        z = encoder(views)  # [V, B, dim]; normalised inside the loss
        loss = fastcl.mv_dhel_loss(z, args.temperature, normalize=True, backend=args.backend)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:5.1f}s")

    print(f"final: loss {loss.item():.4f}, knn top1 {knn_accuracy(encoder, bank, queries):.3f}")


if __name__ == "__main__":
    main()
