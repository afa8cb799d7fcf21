"""The two-tower CLIP of ``clip_two_towers.py``, trained data-parallel with DDP and a distributed loss.

Each process draws its own shard of pairs; the loss contrasts every local image with the texts of
*all* ranks (and vice versa), exactly as open_clip's ``ClipLoss(local_loss=True,
gather_with_grad=True)``, for which ``fastcl.nn.ClipLoss`` is a drop-in. With ``--strategy`` the
example calls ``fastcl.distributed.clip_loss`` instead: ``allgather`` gathers the features once,
``ring`` passes feature blocks from rank to rank so no rank ever holds the whole global batch.
Runs on CPU with gloo, or on GPUs with nccl (one process per GPU).

    torchrun --nproc_per_node 2 examples/ddp_clip.py
    torchrun --nproc_per_node 2 examples/ddp_clip.py --strategy ring --steps 100
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fastcl
import fastcl.distributed
from clip_two_towers import Modality, TwoTowers, retrieval_top1  # same directory: the model and data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--batch", type=int, default=512, help="pairs per process (global batch: batch * world)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension")
    p.add_argument("--seed", type=int, default=0, help="seeds the data (each rank draws its own shard) and the towers")
    p.add_argument("--backend", default="auto", help="fastcl backend: auto, reference, chunked, cpu, ...")
    p.add_argument("--strategy", choices=["allgather", "ring"], default=None,
                   help="call fastcl.distributed.clip_loss with this strategy (None: fastcl.nn.ClipLoss)")
    p.add_argument("--log-every", type=int, default=50, help="steps between printed losses")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(args.seed)  # the same modalities and initial weights on every rank ...
    gen = torch.Generator().manual_seed(args.seed)
    latent = 32
    to_image, to_text = Modality(latent, 96, gen, noise=0.4), Modality(latent, 48, gen, noise=0.4)

    def pairs(n):
        z = torch.randn(n, latent, generator=gen)
        return to_image(z, gen).to(device), to_text(z, gen).to(device)

    held_out = pairs(1000)
    gen.manual_seed(args.seed + 1 + rank)  # ... but different training pairs on each rank

    model = DDP(TwoTowers(96, 48, args.dim).to(device), device_ids=[device.index] if cuda else None)
    criterion = fastcl.nn.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                                   backend=args.backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    def global_mean(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t.item() / world

    name = f"fastcl.distributed.clip_loss(strategy={args.strategy!r})" if args.strategy else "fastcl.nn.ClipLoss"
    log(f"world {world} ({dist.get_backend()}), global batch {args.batch * world}, loss {name}")
    i2t, t2i = retrieval_top1(model.module, *held_out)
    log(f"start: i2t top1 {i2t:.3f}, t2i top1 {t2i:.3f} (chance {1 / len(held_out[0]):.3f})")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        img, txt, scale = model(*pairs(args.batch))
        if args.strategy:
            loss = fastcl.distributed.clip_loss(img, txt, scale, strategy=args.strategy, backend=args.backend)
        else:
            loss = criterion(img, txt, scale)
        opt.zero_grad()
        loss.backward()  # DDP averages the gradients over ranks
        opt.step()
        with torch.no_grad():
            model.module.logit_scale.clamp_(0, math.log(100))
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            mean = global_mean(loss)
            log(f"step {step:4d}  loss {mean:.4f}  scale {scale.item():6.2f}  {time.perf_counter() - start:5.1f}s")

    i2t, t2i = retrieval_top1(model.module, *held_out)
    log(f"final: loss {mean:.4f}, i2t top1 {i2t:.3f}, t2i top1 {t2i:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
