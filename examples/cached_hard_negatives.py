"""Text-embedding-style retrieval training: a large cached batch and mined hard negatives.

A synthetic corpus of "documents" (bags of token ids) comes in families of near-duplicates: each
document has a latent topic vector close to its family's, and its tokens are drawn from a
distribution set by that vector. A query is a few tokens drawn from a slightly perturbed version of
one document's topic. Two towers (EmbeddingBag + MLP with dropout) embed queries and documents.

Every step trains on ``--batch`` (query, document) pairs with ``fastcl.cached_backward``: the batch
is embedded ``--chunk`` rows at a time, so the towers' activations never exist for the whole batch
at once, while the InfoNCE loss still sees every in-batch negative. Every ``--mine-every`` steps the
corpus is embedded without a graph and ``fastcl.topk`` finds, for every training query, the
documents most similar to it other than its own (``row_keys``/``col_keys`` exclude the positive),
never holding the queries x corpus similarity matrix. One of each query's ``--k`` hardest
documents joins the batch as a third input of the document tower, and the loss takes them as
``extra_negatives``; with ``--mochi S`` each query also gets S MoCHi mixtures of its hardest mined
negatives (``fastcl.mix_hard_negatives``).

    python examples/cached_hard_negatives.py                 # one to two minutes on a quiet 2-core CPU machine
    OMP_NUM_THREADS=1 python examples/cached_hard_negatives.py # on a busy machine (README, Quickstart)
    python examples/cached_hard_negatives.py --steps 30 --batch 512 --chunk 128 --mochi 2
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastcl


class Corpus:
    """Families of near-duplicate documents over a shared vocabulary, and queries for them."""

    def __init__(self, families: int, per_family: int, vocab: int, doc_len: int, query_len: int,
                 gen: torch.Generator, latent: int = 16):
        centres = torch.randn(families, latent, generator=gen)
        self.topics = (centres.repeat_interleave(per_family, 0)
                       + 0.6 * torch.randn(families * per_family, latent, generator=gen))
        self.words = 3.0 * torch.randn(vocab, latent, generator=gen) / math.sqrt(latent)
        self.query_len, self.gen = query_len, gen
        self.docs = self.tokens(self.topics, doc_len)

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, topics: torch.Tensor, length: int) -> torch.Tensor:
        probs = torch.softmax(topics @ self.words.T, dim=1)
        return torch.multinomial(probs, length, replacement=True, generator=self.gen)

    def queries(self, doc_ids: torch.Tensor) -> torch.Tensor:
        noisy = self.topics[doc_ids] + 0.3 * torch.randn(len(doc_ids), self.topics.shape[1], generator=self.gen)
        return self.tokens(noisy, self.query_len)


class Tower(nn.Module):
    def __init__(self, vocab: int, dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, hidden, mode="mean")
        self.mlp = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, dim))

    def forward(self, tokens):  # [rows, length] token ids -> [rows, dim] unit vectors
        return F.normalize(self.mlp(self.bag(tokens)), dim=-1)


@torch.no_grad()
def embed(tower: Tower, tokens: torch.Tensor, chunk: int) -> torch.Tensor:
    was_training = tower.training
    tower.eval()
    out = torch.cat([tower(tokens[a:a + chunk]) for a in range(0, len(tokens), chunk)])
    tower.train(was_training)
    return out


def recall(query_tower, doc_tower, corpus: Corpus, queries, doc_ids, chunk: int, at=(1, 10)) -> dict[int, float]:
    """Recall@k of retrieving each held-out query's document among the whole corpus (streaming top-k)."""
    q, d = embed(query_tower, queries, chunk), embed(doc_tower, corpus.docs, chunk)
    found = fastcl.topk(q, d, max(at)).indices == doc_ids[:, None]
    return {k: found[:, :k].any(1).float().mean().item() for k in at}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimiser steps")
    p.add_argument("--batch", type=int, default=2048, help="pairs per step (the cached batch)")
    p.add_argument("--chunk", type=int, default=256, help="rows the towers embed at a time")
    p.add_argument("--k", type=int, default=8, help="mine among each query's k hardest documents")
    p.add_argument("--mine-every", type=int, default=5, help="steps between corpus re-embeddings")
    p.add_argument("--mochi", type=int, default=0, help="MoCHi mixtures of hard negatives per query")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--families", type=int, default=512, help="families of near-duplicate documents in the corpus")
    p.add_argument("--per-family", type=int, default=8, help="documents per family (corpus: families * per-family)")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus, the towers and the mining draws")
    p.add_argument("--log-every", type=int, default=10, help="steps between printed losses")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vocab = 1000
    corpus = Corpus(args.families, args.per_family, vocab, doc_len=32, query_len=8, gen=gen)
    doc_ids = torch.arange(len(corpus))
    eval_ids = torch.randint(0, len(corpus), (1000,), generator=gen)
    eval_queries = corpus.queries(eval_ids)
    query_tower, doc_tower = Tower(vocab, 64), Tower(vocab, 64)
    opt = torch.optim.Adam([*query_tower.parameters(), *doc_tower.parameters()], lr=2e-3)

    def loss_fn(q, d, hard):
        negatives = hard
        if args.mochi:  # mixtures of each query's hardest mined negatives, shared as extra columns
            hardest = fastcl.topk(q.detach(), hard.detach(), min(4, len(hard))).indices
            mixed = fastcl.mix_hard_negatives(q, hard, hardest, num_mixed=args.mochi, generator=gen)
            negatives = torch.cat([hard, mixed.flatten(0, 1)])
        return fastcl.infonce_loss(q, d, args.temperature, extra_negatives=negatives)

    r = recall(query_tower, doc_tower, corpus, eval_queries, eval_ids, args.chunk)
    print(f"start: recall top1 {r[1]:.3f}, recall top10 {r[10]:.3f} "
          f"(corpus {len(corpus)}, chance {1 / len(corpus):.4f})")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        positives = torch.randperm(len(corpus), generator=gen)[:args.batch]
        queries = corpus.queries(positives)
        if (step - 1) % args.mine_every == 0:  # a fresh index of the corpus, as an ANCE-style refresh
            index = embed(doc_tower, corpus.docs, args.chunk)
        # The k documents closest to each query, its own excluded: draw one of them as the hard
        # negative (the very closest is the likeliest false negative in real data).
        mined = fastcl.topk(embed(query_tower, queries, args.chunk), index, args.k, row_keys=positives,
                            col_keys=doc_ids).indices
        hard = mined.gather(1, torch.randint(0, args.k, (len(positives), 1), generator=gen))[:, 0]
        loss = fastcl.cached_backward(loss_fn, [query_tower, doc_tower, doc_tower],
                                      [queries, corpus.docs[positives], corpus.docs[hard]], chunk_size=args.chunk)
        opt.step()
        opt.zero_grad()
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.perf_counter() - start:5.1f}s")

    r = recall(query_tower, doc_tower, corpus, eval_queries, eval_ids, args.chunk)
    print(f"final: loss {loss.item():.4f}, recall top1 {r[1]:.3f}, recall top10 {r[10]:.3f}")


if __name__ == "__main__":
    main()
