r"""fastcl.integrations on CPU against the libraries they replace (issue 25's acceptance benchmark).

    # full size (the defaults spelled out), on a quiet machine, from the repository root:
    PYTHONPATH=python HF_HUB_OFFLINE=1 python bench/integrations.py --studies st,colpali --batch 1024,4096 \
        --mini-batch 64 --dims 128,64,32,16,8 --repeat 3 --colpali-b 64 --out bench/results/DATE-cpu-integrations.json
    # smoke (seconds a case; tests/test_bench_integrations.py runs it smaller still, in one process):
    PYTHONPATH=python HF_HUB_OFFLINE=1 python bench/integrations.py --batch 64 --repeat 1 --colpali-b 8 \
        --out /tmp/integrations.json

Estimated from the smoke run (not measured): about 10 minutes on 2 cores, most of it batch 4096; the
plain MNRL step at 4096 holds the whole batch's graph, about 7 GiB.

Studies, each case in a fresh process (``harness.run_isolated``: CPU peak memory is VmHWM growth, time
from ``harness.measure``: the memory call on a cold step after a tiny warm-up, then ``--repeat`` timed steps):

- ``st``: one training step (loss + backward, gradients set to None after) of a tiny BERT built offline
  in code (``transformers.BertConfig``: 2 layers, hidden 128, 2 heads, intermediate 512, vocab 1000;
  saved to a temporary folder with a word-level tokenizer and loaded as sentence-transformers'
  ``Transformer`` with a mean ``Pooling``; train mode, BERT's dropout 0.1), on anchor and positive
  columns of random token ids, length 32, batch ``--batch`` (1024 and 4096), mini-batch ``--mini-batch``
  (64), ``scale=20``, ``cos_sim``:
  (a) ``fastcl cached``: ``fastcl.integrations.sentence_transformers.CachedMultipleNegativesRankingLoss``;
  (b) ``st cached``: sentence-transformers' ``CachedMultipleNegativesRankingLoss``;
  (c) ``st plain``: sentence-transformers' ``MultipleNegativesRankingLoss`` (no cache: the whole batch's graph);
  (d) ``fastcl matryoshka``: fastcl's ``MatryoshkaLoss`` around (a), ``--dims`` (5: 128,64,32,16,8);
  (e) ``st matryoshka``: sentence-transformers' ``MatryoshkaLoss`` around (b), the same dims.
  Ratios: (a)/(c), (a)/(b); Matryoshka overhead (d)/(a) - 1 against (e)/(b) - 1.
- ``colpali``: ``fastcl.integrations.colpali.ColbertLoss`` against colpali-engine's ``ColbertLoss``
  restated in torch (colpali-engine is not installed; its ``einsum("bnd,csd->bcns")``, ``amax``, sum,
  division by the query lengths and cross-entropy on the full ``[B, B, Lq, Ld]`` tensor, as
  ``tests/test_integrations_late_interaction.py``'s ``ColpaliReference.colbert``), forward+backward to
  the token embeddings, B = ``--colpali-b`` (64), Lq = 32, Ld = 512, D = 128, float32, unit tokens.

Issue 25's goals: (a) within 1.4x of (c) and faster than (b); fastcl's Matryoshka overhead under 5%;
the colpali equivalent under 5% of colpali's peak memory. Rows carry ``other_cpu_frac`` (``busy``: the
CPU time other processes used during the case, as a share of all cores) and the 1-minute load average
before the case: numbers from a loaded machine are not the acceptance run's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import harness

ST_IMPLS = ("fastcl cached", "st cached", "st plain", "fastcl matryoshka", "st matryoshka")
COLPALI_IMPLS = ("fastcl ColbertLoss", "colpali (torch)")
VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 1000, 128, 2, 2, 512


# --- the st study (runs in the case's own process) -------------------------------------------------

def tiny_bert(seq_len: int):
    """A randomly initialised 2-layer BERT as a SentenceTransformer (Transformer + mean Pooling), offline:
    the model and a word-level tokenizer are saved to a temporary folder and loaded as a local path."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=max(64, seq_len))
    words = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, VOCAB)}},
                                       unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    with tempfile.TemporaryDirectory() as folder:
        BertModel(config).save_pretrained(folder)
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
        model = SentenceTransformer(modules=[Transformer(folder, max_seq_length=seq_len), Pooling(HIDDEN, "mean")],
                                    device="cpu")
    return model.train()


def columns(batch: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Anchor and positive columns: random token ids (no padding), as a tokenizer would hand them over."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(2, VOCAB, (batch, seq_len), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def st_loss(impl: str, model, mini_batch: int, dims: list[int]):
    from sentence_transformers.sentence_transformer import losses as st

    from fastcl.integrations import sentence_transformers as fst

    if impl == "fastcl cached":
        return fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    if impl == "st cached":
        return st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch)
    if impl == "st plain":
        return st.MultipleNegativesRankingLoss(model)
    if impl == "fastcl matryoshka":
        return fst.MatryoshkaLoss(model, fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch),
                                  dims)
    if impl == "st matryoshka":
        return st.MatryoshkaLoss(model, st.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch), dims)
    raise ValueError(f"unknown impl {impl!r}; one of {ST_IMPLS}")


def st_case(spec: dict) -> dict:
    model = tiny_bert(spec["seq_len"])
    losses = []

    def step_on(loss_fn, features):
        def step():
            loss = loss_fn([dict(f) for f in features], None)  # the modules write into the dicts
            loss.backward()
            losses.append(loss.item())
            model.zero_grad(set_to_none=True)
        return step

    # the warm-up (imports, lazy initialisation) at 8 rows in chunks of 4: a chunk of the real size
    # would grow the heap by the real chunk's activations, which the measured call would then reuse
    warm_up = step_on(st_loss(spec["impl"], model, 4, spec["dims"]), columns(8, spec["seq_len"], 1))
    step = step_on(st_loss(spec["impl"], model, spec["mini_batch"], spec["dims"]),
                   columns(spec["batch"], spec["seq_len"]))
    result = harness.measure(step, spec["repeat"], warm_up=warm_up)
    return {**result, "loss": losses[1]}  # the measured (cold) call's, after the warm-up's


def st_paired_case(spec: dict) -> dict:
    """The st study's implementations timed interleaved in one process (``--paired``): one model, each
    loss warmed up and called once, then rounds of one step each (``harness.time_interleaved``), so that
    whatever else the machine does meets every implementation alike. Times only (peak memory is the
    separate cases')."""
    model = tiny_bert(spec["seq_len"])
    features = columns(spec["batch"], spec["seq_len"])

    def step_on(loss_fn, cols):
        def step():
            loss_fn([dict(f) for f in cols], None).backward()  # the modules write into the dicts
            model.zero_grad(set_to_none=True)
        return step

    steps = {}
    for impl in spec.get("impls") or ST_IMPLS:
        step_on(st_loss(impl, model, 4, spec["dims"]), columns(8, spec["seq_len"], 1))()
        steps[impl] = step_on(st_loss(impl, model, spec["mini_batch"], spec["dims"]), features)
        steps[impl]()
    return {"times_s": harness.time_interleaved(steps, 0.0, spec["repeat"])}


def paired_ratio(times: dict, a: str, b: str) -> float | None:
    """The median over rounds of a's step time over b's in the same round."""
    return harness.paired_ratio(times[a], times[b]) if a in times and b in times else None


def faster_rounds(times: dict, a: str, b: str) -> str:
    """In how many rounds a's step took less time than b's: a ratio near 1 is read with it."""
    if a not in times or b not in times:
        return "n/a"
    return f"{sum(x < y for x, y in zip(times[a], times[b]))} of {min(len(times[a]), len(times[b]))} rounds"


# --- the colpali study -----------------------------------------------------------------------------

def colpali_colbert_loss(q: torch.Tensor, d: torch.Tensor, temperature: float = 0.02) -> torch.Tensor:
    """colpali-engine's ``ColbertLoss`` (normalize_scores=True, no filtering, offset 0), op for op: the
    token similarities of every query against every document, ``[B, C, Lq, Ld]``."""
    lengths = (q[:, :, 0] != 0).sum(dim=1)
    scores = torch.einsum("bnd,csd->bcns", q, d).amax(dim=3).sum(dim=2) / lengths.unsqueeze(1)
    return F.cross_entropy(scores / temperature, torch.arange(scores.shape[0]))


def colpali_case(spec: dict) -> dict:
    from fastcl.integrations.colpali import ColbertLoss

    loss_fn = ColbertLoss(temperature=0.02) if spec["impl"] == "fastcl ColbertLoss" else colpali_colbert_loss
    losses = []

    def step_on(b: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        q = F.normalize(torch.randn(b, spec["lq"], spec["d"], generator=g), dim=-1).requires_grad_()
        d = F.normalize(torch.randn(b, spec["ld"], spec["d"], generator=g), dim=-1).requires_grad_()

        def step():
            loss = loss_fn(q, d)
            loss.backward()
            losses.append(loss.item())
            q.grad = d.grad = None
        return step

    result = harness.measure(step_on(spec["b"], 0), spec["repeat"], warm_up=step_on(min(spec["b"], 4), 1))
    return {**result, "loss": losses[1]}


def case(spec: dict) -> dict:
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    return {"st": st_case, "st-paired": st_paired_case, "colpali": colpali_case}[spec["study"]](spec)


# --- the parent ------------------------------------------------------------------------------------

def specs(args) -> list[dict]:
    threads = {"torch_threads": args.threads} if args.threads else {}
    out = []
    if "st" in args.studies:
        if not args.only_paired:
            out += [{"study": "st", "impl": impl, "batch": b, "mini_batch": args.mini_batch, "seq_len": args.seq_len,
                     "dims": args.dims, "repeat": args.repeat, **threads} for b in args.batch for impl in ST_IMPLS]
        if args.paired:
            out += [{"study": "st-paired", "impl": "interleaved", "batch": b, "mini_batch": args.mini_batch,
                     "seq_len": args.seq_len, "dims": args.dims, "repeat": args.paired, "impls": args.paired_impls,
                     **threads} for b in args.batch]
    if "colpali" in args.studies:
        out += [{"study": "colpali", "impl": impl, "b": args.colpali_b, "lq": args.colpali_lq, "ld": args.colpali_ld,
                 "d": args.colpali_d, "repeat": args.repeat, **threads} for impl in COLPALI_IMPLS]
    return out


def _ratio(a: dict | None, b: dict | None, key: str = "median_s") -> float | None:
    ok = a and b and a.get("status") == b.get("status") == "ok" and b[key] > 0
    return a[key] / b[key] if ok else None


def _table(lines: list[str], columns: list[str], cells: list[list[str]]) -> None:
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.extend("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
    lines.append("")


def _cells(r: dict, shape: list[str]) -> list[str]:
    threads = str(r.get("torch_threads") or r.get("threads", ""))
    if r.get("status") != "ok":
        return [r["impl"], threads, *shape, r.get("status", "?"), "", "", r.get("note", "")[:60], "", ""]
    return [r["impl"], threads, *shape, f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}",
            f"{r['peak_extra_bytes'] / harness.MiB:.1f}", f"{r['loss']:.4f}", f"{r.get('other_cpu_frac', 0):.0%}",
            f"{r.get('loadavg', 0):.2f}"]


def _x(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{v - 1:+.1%}" if pct else f"{v:.2f}x"


def show(rows: list[dict]) -> str:
    first = rows[0] if rows else {}
    lines = [f"bench/integrations.py on {first.get('cpu', '?')}, {first.get('cores', '?')} cores; torch "
             f"{first.get('torch', '?')}, sentence-transformers {first.get('sentence_transformers', '?')}, fastcl "
             f"{first.get('fastcl', '?')}, git {first.get('git_sha', '?')[:10]}"
             f"{' (dirty)' if first.get('git_dirty') else ''}; {first.get('date', '?')[:10]}", ""]
    tail = ["median ms", "min ms", "peak MiB", "loss", "busy", "load"]
    st = [r for r in rows if r["study"] == "st"]
    lines += ["st-paired: " + r.get("status", "?") + " " + r.get("note", "") for r in rows
              if r["study"] == "st-paired" and r.get("status") != "ok"]
    if st:
        r0 = st[0]
        lines.append(f"st: one training step (loss + backward) of a tiny BERT ({LAYERS} layers, hidden {HIDDEN}, "
                     f"{HEADS} heads, vocab {VOCAB}, mean pooling, dropout on), 2 columns of {r0['seq_len']} tokens, "
                     f"float32; Matryoshka dims {','.join(map(str, r0['dims']))}")
        _table(lines, ["impl", "threads", "batch", "mini", *tail],
               [_cells(r, [str(r["batch"]), str(r["mini_batch"])]) for r in st])
        for batch in dict.fromkeys(r["batch"] for r in st):
            by = {r["impl"]: r for r in st if r["batch"] == batch}
            a, b, c = by.get("fastcl cached"), by.get("st cached"), by.get("st plain")
            d, e = by.get("fastcl matryoshka"), by.get("st matryoshka")
            lines += [f"batch {batch}: fastcl cached / st plain {_x(_ratio(a, c))} (goal <= 1.4x); "
                      f"fastcl cached / st cached {_x(_ratio(a, b))} (goal < 1x); peak memory fastcl cached / "
                      f"st cached {_x(_ratio(a, b, 'peak_extra_bytes'))}, / st plain "
                      f"{_x(_ratio(a, c, 'peak_extra_bytes'))}",
                      f"batch {batch}: Matryoshka overhead fastcl {_x(_ratio(d, a), pct=True)} (goal < 5%), "
                      f"sentence-transformers {_x(_ratio(e, b), pct=True)}"]
        lines.append("")
    paired = [r for r in rows if r["study"] == "st-paired" and r.get("status") == "ok"]
    for r in paired:
        t = r["times_s"]
        rounds = min(len(v) for v in t.values())
        median_ms = ", ".join(f"{impl} {statistics.median(v) * 1e3:.0f}" for impl, v in t.items())
        lines += [f"batch {r['batch']}, interleaved ({rounds} rounds of one step each, in one process; median ms: "
                  f"{median_ms}):",
                  f"  fastcl cached / st plain {_x(paired_ratio(t, 'fastcl cached', 'st plain'))} (goal <= 1.4x); "
                  f"fastcl cached / st cached {_x(paired_ratio(t, 'fastcl cached', 'st cached'))} (goal < 1x; "
                  f"fastcl faster in {faster_rounds(t, 'fastcl cached', 'st cached')})",
                  f"  Matryoshka overhead fastcl {_x(paired_ratio(t, 'fastcl matryoshka', 'fastcl cached'), pct=True)}"
                  f" (goal < 5%), sentence-transformers {_x(paired_ratio(t, 'st matryoshka', 'st cached'), pct=True)}",
                  ""]
    cp = [r for r in rows if r["study"] == "colpali"]
    if cp:
        r0 = cp[0]
        lines.append(f"colpali: ColbertLoss forward+backward, B = C = {r0['b']}, Lq = {r0['lq']}, Ld = {r0['ld']}, "
                     f"D = {r0['d']}, float32 (colpali's [B, C, Lq, Ld] tensor: "
                     f"{r0['b'] ** 2 * r0['lq'] * r0['ld'] * 4 / harness.MiB:.0f} MiB)")
        _table(lines, ["impl", "threads", "B", *tail], [_cells(r, [str(r["b"])]) for r in cp])
        by = {r["impl"]: r for r in cp}
        ours, theirs = by.get("fastcl ColbertLoss"), by.get("colpali (torch)")
        peak = _ratio(ours, theirs, "peak_extra_bytes")
        lines += [f"fastcl / colpali: peak memory {'n/a' if peak is None else f'{peak:.1%}'} (goal < 5%), "
                  f"time {_x(_ratio(ours, theirs))}", ""]
    lines += ["peak MiB: VmHWM growth of the first (cold) step beyond its inputs and model, gradients included.",
              "loss: that step's loss (dropout on in st: each implementation draws its own masks).",
              "busy: CPU time other processes used during the case, as a share of all cores (above ~5%: rerun).",
              "load: 1-minute load average before the case (this benchmark's previous case included)."]
    return "\n".join(lines)


def parse_args(argv=None):
    ints = lambda s: [int(v) for v in s.split(",")]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default="st,colpali", type=lambda s: s.split(","), help="st, colpali")
    p.add_argument("--batch", default="1024,4096", type=ints, help="st: batch sizes (rows per column)")
    p.add_argument("--mini-batch", type=int, default=64, help="st: the cached losses' mini_batch_size")
    p.add_argument("--seq-len", type=int, default=32, help="st: tokens per text")
    p.add_argument("--dims", default="128,64,32,16,8", type=ints, help="st: Matryoshka dims (<= 128)")
    p.add_argument("--colpali-b", type=int, default=64, help="colpali: queries = documents")
    p.add_argument("--colpali-lq", type=int, default=32)
    p.add_argument("--colpali-ld", type=int, default=512)
    p.add_argument("--colpali-d", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="timed steps per case")
    p.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    p.add_argument("--paired", type=int, default=0,
                   help="st: also time the implementations interleaved in one process per batch, this many "
                        "rounds of one step each; the ratios then come from steps taken side by side (0: off)")
    p.add_argument("--out", type=Path, default=None, help="JSON rows; the table goes beside it as .txt")
    p.add_argument("--paired-impls", default=None, type=lambda s: s.split(","),
                   help=f"st: the implementations --paired times (default: all of {','.join(ST_IMPLS)})")
    p.add_argument("--only-paired", action="store_true", help="st: skip the separate cases (--paired only)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps({"status": "ok", **case(json.loads(args.case))}))
        return
    import sentence_transformers

    env = {**harness.environment("cpu"), "sentence_transformers": sentence_transformers.__version__}
    rows = []
    for spec in specs(args):
        harness.progress(" ".join(f"{k}={v}" for k, v in spec.items()))
        load = _load()
        rows.append({**spec, **harness.run_isolated(__file__, spec, timeout=3600), "loadavg": load, **env})
        if args.out:  # rows as they finish: a run stopped early keeps what it measured
            harness.write_json(rows, args.out)
    text = show(rows)
    print(text)
    if args.out:
        args.out.with_suffix(".txt").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
