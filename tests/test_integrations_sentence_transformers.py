"""fastcl.integrations.sentence_transformers against sentence-transformers' own losses: loss values and
the tiny model's parameter gradients in float64, every supported option, hard negatives, both
similarity functions; the cached classes against the plain ones; a few optimizer steps of a loop that
calls ``loss.backward()`` itself, and 3 steps of SentenceTransformerTrainer itself (with ``datasets`` and
``accelerate``); the multi-vector loss against a tiny MultiVectorEncoder's. Offline: the model is a tiny
randomly initialised module and a word-level tokenizer built here."""
import random

import pytest
import torch
from torch import nn

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers import util as st_util  # noqa: E402
from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from fastcl.integrations import sentence_transformers as fst  # noqa: E402

VOCAB = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(40)}}
DIM = 16


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


class TinyEncoder(nn.Module):
    """Mean of token embeddings over the mask, then a linear layer: a sentence embedding [rows, DIM]."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), DIM)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(DIM, DIM)
        self.tokenizer = _tokenizer()
        self.max_seq_length = 8

    def forward(self, features):
        mask = features["attention_mask"].to(self.emb.weight.dtype)
        h = self.emb(features["input_ids"]) * mask[..., None]
        features["sentence_embedding"] = self.proj(self.drop(torch.tanh(h.sum(1) / mask.sum(1, keepdim=True))))
        return features

    def get_embedding_dimension(self) -> int:
        return DIM

    def preprocess(self, inputs, **kwargs):
        """Texts -> padded ``input_ids``/``attention_mask``, what the trainer's collator asks of a module."""
        return self.tokenizer(list(inputs), padding=True, truncation=True, max_length=self.max_seq_length,
                              return_tensors="pt", return_token_type_ids=False)


def tiny_model(seed: int, dropout: float = 0.0) -> SentenceTransformer:
    torch.manual_seed(seed)
    return SentenceTransformer(modules=[TinyEncoder(dropout)], device="cpu").double()


def batch(columns: int, rows: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``columns`` tokenized columns (anchor, positive, negatives...) of ``rows`` texts of 2-6 tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(columns):
        ids = torch.randint(2, len(VOCAB), (rows, 6), generator=g)
        lengths = torch.randint(2, 7, (rows,), generator=g)
        mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def loss_and_grads(model, loss, features):
    """The loss of a fresh copy of ``features`` and the gradients of every parameter it reaches."""
    model.zero_grad(set_to_none=True)
    value = loss([dict(f) for f in features], None)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads


def assert_same(model, ours, theirs, features, rtol=1e-9, atol=1e-12):
    v1, g1 = loss_and_grads(model, ours, features)
    v2, g2 = loss_and_grads(model, theirs, features)
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    return v1


SYMMETRIC = dict(directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction")
SIMILARITIES = [pytest.param(st_util.cos_sim, 20.0, id="cos_sim"), pytest.param(st_util.dot_score, 1.0, id="dot")]
QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTIONS = [((QD,), "joint"), ((QD, DQ), "per_direction"), ((QD, DQ), "joint"), ((QD, QQ), "joint"),
              ((QD, DD), "joint"), ((QD, DQ, DD), "joint"), ((QD, QQ, DQ, DD), "joint")]


@pytest.mark.parametrize("directions,partition_mode", DIRECTIONS, ids=lambda v: "+".join(v) if isinstance(v, tuple)
                         else v)
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("similarity_fct,scale", SIMILARITIES)
def test_mnrl_equals_sentence_transformers(similarity_fct, scale, negatives, directions, partition_mode):
    model = tiny_model(0)
    kw = dict(scale=scale, similarity_fct=similarity_fct, directions=directions, partition_mode=partition_mode)
    assert_same(model, fst.MultipleNegativesRankingLoss(model, **kw),
                st_losses.MultipleNegativesRankingLoss(model, **kw), batch(2 + negatives, 7))


def test_mnrl_accepts_what_changes_nothing_and_refuses_the_rest():
    model = tiny_model(0)
    # hardness_mode without strength and gather_across_devices in one process change nothing
    kw = dict(hardness_mode="hard_negatives", hardness_strength=0.0, gather_across_devices=True)
    assert_same(model, fst.MultipleNegativesRankingLoss(model, **kw),
                st_losses.MultipleNegativesRankingLoss(model, **kw), batch(3, 5))
    with pytest.raises(NotImplementedError, match="hardness_mode='in_batch_negatives'"):
        fst.MultipleNegativesRankingLoss(model, hardness_mode="in_batch_negatives", hardness_strength=9.0)
    with pytest.raises(NotImplementedError, match="similarity_fct=euclidean_sim"):
        fst.MultipleNegativesRankingLoss(model, similarity_fct=st_util.euclidean_sim)
    with pytest.raises(NotImplementedError, match="mini_batch_num_tokens"):
        fst.CachedMultipleNegativesRankingLoss(model, mini_batch_num_tokens=128)
    with pytest.raises(ValueError, match="query_to_doc"):  # sentence-transformers' own checks, unchanged
        fst.MultipleNegativesRankingLoss(model, directions=(DQ,))


def test_config_and_citation_are_sentence_transformers():
    model = tiny_model(0)
    kw = dict(scale=10.0, directions=(QD, DQ), partition_mode="per_direction")
    ours, theirs = fst.MultipleNegativesRankingLoss(model, **kw), st_losses.MultipleNegativesRankingLoss(model, **kw)
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation
    assert ours.temperature == theirs.temperature
    ours = fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw)
    theirs = st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw)
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation
    assert ours.scale == 10.0 and ours.model is model
    m = fst.MatryoshkaLoss(model, fst.MultipleNegativesRankingLoss(model), [4, 16, 8], [1, 2, 3])
    t = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), [4, 16, 8], [1, 2, 3])
    assert m.get_config_dict() == t.get_config_dict() and m.citation == t.citation
    guide = tiny_model(1)  # sentence-transformers' CachedGISTEmbedLoss has no citation: nor has fastcl's
    assert not hasattr(fst.CachedGISTEmbedLoss(model, guide), "citation")
    assert not hasattr(st_losses.CachedGISTEmbedLoss(model, guide), "citation")


@pytest.mark.parametrize("directions,partition_mode", [((QD,), "joint"), ((QD, QQ, DQ, DD), "joint"),
                                                       ((QD, DQ), "per_direction")], ids=["qd", "gte", "symmetric"])
def test_cached_mnrl_equals_plain(directions, partition_mode):
    """mini_batch_size 4 over 10 rows (chunks 4, 4, 2), hard negatives; the plain loss of
    sentence-transformers and its cached one as references."""
    model = tiny_model(1)
    kw = dict(directions=directions, partition_mode=partition_mode)
    features = batch(3, 10, seed=1)
    cached = fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw)
    value = assert_same(model, cached, st_losses.MultipleNegativesRankingLoss(model, **kw), features)
    assert_same(model, cached, st_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4, **kw), features)
    with torch.no_grad():  # a trainer's evaluation: no graph, the same value
        torch.testing.assert_close(cached([dict(f) for f in features], None), value, rtol=1e-12, atol=0)


def test_cached_losses_take_hyperparameters_assigned_after_construction():
    """``loss.scale = 5.0`` on a cached loss reaches the loss it computes, as in sentence-transformers
    (its CachedMNRL forwards the assignment to the plain loss it wraps; its CachedGIST holds them
    itself). Found by its test_cmnrl_hyperparameters_stay_assignable (tools/peer_tests.py)."""
    model, guide = tiny_model(1), tiny_model(2)
    features = batch(3, 7, seed=4)
    cached = fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    cached.scale = 5.0
    assert cached.scale == cached.loss.scale == 5.0 and "scale" not in cached.__dict__
    assert_same(model, cached, st_losses.MultipleNegativesRankingLoss(model, scale=5.0), features)
    similarity = torch.nn.CosineSimilarity(dim=-1)
    cached.similarity_fct = similarity
    assert cached.loss.similarity_fct is similarity and "similarity_fct" not in cached._modules
    gist = fst.CachedGISTEmbedLoss(model, guide, mini_batch_size=3)
    gist.temperature, gist.margin = 0.05, 0.1
    assert_same(model, gist, st_losses.GISTEmbedLoss(model, guide, temperature=0.05, margin=0.1), features)


def test_cached_losses_refuse_static_embedding_and_flag_their_hook_as_sentence_transformers():
    """Found by sentence-transformers' own tests (tools/peer_tests.py): a StaticEmbedding's features
    have no batch dimension to chunk, refused with its words; ``uses_gradient_cache`` makes its
    AdaptiveLayerLoss warn, as for its own cached losses (the backward runs in a hook)."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    static = SentenceTransformer(modules=[StaticEmbedding(_tokenizer().backend_tokenizer, embedding_dim=8)])
    for name, kw in (("CachedMultipleNegativesRankingLoss", {}), ("CachedGISTEmbedLoss", {"guide": static})):
        for module in (fst, st_losses):
            with pytest.raises(ValueError, match=f"{name} is not compatible with a SentenceTransformer model based on "
                                                 "a StaticEmbedding"):
                getattr(module, name)(static, **kw)
        assert getattr(st_losses, name).uses_gradient_cache is getattr(fst, name).uses_gradient_cache is True


def gist_pair():
    return tiny_model(2), tiny_model(3)


@pytest.mark.parametrize("margin", [0.0, 0.1])
@pytest.mark.parametrize("contrast_anchors,contrast_positives", [(True, True), (False, False), (True, False),
                                                                  (False, True)])
@pytest.mark.parametrize("negatives", [0, 1])
def test_gist_equals_sentence_transformers(negatives, contrast_anchors, contrast_positives, margin):
    model, guide = gist_pair()
    kw = dict(temperature=0.05, margin=margin, contrast_anchors=contrast_anchors,
              contrast_positives=contrast_positives)
    assert_same(model, fst.GISTEmbedLoss(model, guide, **kw), st_losses.GISTEmbedLoss(model, guide, **kw),
                batch(2 + negatives, 9, seed=2))


def test_cached_gist_equals_plain_and_refuses_relative():
    model, guide = gist_pair()
    features = batch(3, 9, seed=3)
    cached = fst.CachedGISTEmbedLoss(model, guide, temperature=0.05, mini_batch_size=4)
    assert_same(model, cached, st_losses.GISTEmbedLoss(model, guide, temperature=0.05), features)
    assert cached.get_config_dict() == st_losses.CachedGISTEmbedLoss(model, guide, temperature=0.05,
                                                                     mini_batch_size=4).get_config_dict()
    with pytest.raises(NotImplementedError, match="margin_strategy='relative'"):
        fst.GISTEmbedLoss(model, guide, margin_strategy="relative", margin=0.1)


MATRYOSHKA = [
    pytest.param(lambda m: fst.MultipleNegativesRankingLoss(m),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m), id="mnrl"),
    pytest.param(lambda m: fst.MultipleNegativesRankingLoss(m, scale=1.0, similarity_fct=st_util.dot_score),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m, scale=1.0, similarity_fct=st_util.dot_score),
                 id="mnrl-dot"),
    pytest.param(lambda m: fst.MultipleNegativesRankingLoss(m, **SYMMETRIC),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m, **SYMMETRIC), id="mnrl-symmetric"),
    pytest.param(lambda m: fst.MultipleNegativesRankingLoss(m, directions=(QD, QQ, DD)),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m, directions=(QD, QQ, DD)), id="mnrl-composite"),
    pytest.param(lambda m: fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m), id="cached-mnrl"),
]


@pytest.mark.parametrize("ours,theirs", MATRYOSHKA)
@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 0.25)])
def test_matryoshka_equals_sentence_transformers(ours, theirs, weights):
    model = tiny_model(4)
    dims = (16, 4, 8)
    assert_same(model, fst.MatryoshkaLoss(model, ours(model), dims, weights),
                st_losses.MatryoshkaLoss(model, theirs(model), dims, weights), batch(3, 7, seed=4))


def test_matryoshka_gist_and_dims_per_step():
    model, guide = gist_pair()
    features = batch(3, 8, seed=5)
    ours = fst.MatryoshkaLoss(model, fst.GISTEmbedLoss(model, guide, temperature=0.05), [16, 8], [1.0, 0.5])
    theirs = st_losses.MatryoshkaLoss(model, st_losses.GISTEmbedLoss(model, guide, temperature=0.05), [16, 8],
                                      [1.0, 0.5])
    assert_same(model, ours, theirs, features)
    dims = [16, 12, 8, 4]
    ours = fst.MatryoshkaLoss(model, fst.MultipleNegativesRankingLoss(model), dims, n_dims_per_step=2)
    theirs = st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), dims, n_dims_per_step=2)
    for seed in range(3):  # the same Python random draws pick the same dimensions
        random.seed(seed)
        v1, g1 = loss_and_grads(model, ours, features)
        random.seed(seed)
        v2, g2 = loss_and_grads(model, theirs, features)
        torch.testing.assert_close(v1, v2, rtol=1e-9, atol=0)
        for name in g1:
            torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="sentence_transformers.losses.MatryoshkaLoss"):
        fst.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model), dims)


def test_cached_loss_in_a_loop_that_calls_backward():
    """What SentenceTransformerTrainer's step does with the loss (``loss.backward()``, here with
    gradient accumulation over 2 micro-steps, as the HF Trainer divides), 3 optimizer steps, dropout
    on: the parameters end where sentence-transformers' plain MNRL takes them."""
    features = [batch(3, 8, seed=10 + s) for s in range(6)]

    def train(make_loss):
        model = tiny_model(5, dropout=0.1)
        loss_fn = make_loss(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(0)
        for step in range(3):
            for micro in range(2):
                loss = loss_fn([dict(f) for f in features[2 * step + micro]], None)
                (loss / 2).backward()
            opt.step()
            opt.zero_grad()
        return list(model.parameters())

    ours = train(lambda m: fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3))
    theirs = train(lambda m: st_losses.MultipleNegativesRankingLoss(m))
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


TRAINER_LOSSES = [
    pytest.param(lambda m: fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3),
                 lambda m: st_losses.MultipleNegativesRankingLoss(m), id="cached-mnrl"),
    pytest.param(lambda m: fst.MatryoshkaLoss(m, fst.CachedMultipleNegativesRankingLoss(m, mini_batch_size=3), [16, 8]),
                 lambda m: st_losses.MatryoshkaLoss(m, st_losses.MultipleNegativesRankingLoss(m), [16, 8]),
                 id="matryoshka-cached-mnrl"),
]


@pytest.mark.parametrize("ours,theirs", TRAINER_LOSSES)
def test_sentence_transformer_trainer(tmp_path, monkeypatch, ours, theirs):
    """3 steps of ``SentenceTransformerTrainer`` (its collator, sampler, AdamW and scheduler; dropout on)
    on an in-memory ``datasets.Dataset`` of (anchor, positive, negative) texts: fastcl's cached loss
    leaves the float32 parameters where sentence-transformers' own MNRL (and Matryoshka) leaves them."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(0)
    texts = {column: [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randint(2, 6))) for _ in range(24)]
             for column in ("anchor", "positive", "negative")}
    dataset = datasets.Dataset.from_dict(texts)

    def train(make_loss, run: str):
        model = tiny_model(9, dropout=0.1).float()
        args = SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / run), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2,
            seed=0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=make_loss(model))
        trainer.train()
        return dict(model.named_parameters()), trainer.state.global_step

    (mine, steps), (reference, _) = train(ours, "fastcl"), train(theirs, "sentence-transformers")
    assert steps == 3
    start = dict(tiny_model(9).float().named_parameters())
    for name, p in mine.items():
        assert not torch.equal(p, start[name]), f"{name} did not move"
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_matryoshka_is_one_sweep_and_float32(monkeypatch):
    """Matryoshka(CachedMNRL) hands all dimensions to fastcl's one-pass engine (``fused_clip``: one
    ``lse_prefixes`` sweep for every prefix). In float32 its error against sentence-transformers'
    float64 loss is at most twice sentence-transformers' own float32 error (loss and every gradient)."""
    from fastcl.backend import registry
    from fastcl.losses import clip

    monkeypatch.setattr(registry, "MATERIALISE_BELOW_PAIRS", {})  # a batch this small would take the reference path
    sweeps = []
    fused = clip.fused_clip
    monkeypatch.setattr(clip, "fused_clip", lambda *a, **k: sweeps.append(k["prefixes"]) or fused(*a, **k))
    dims, features = [16, 8, 4], batch(3, 9, seed=6)
    model = tiny_model(6)
    reference = loss_and_grads(model, st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model),
                                                               dims), features)
    model.float()
    ours = loss_and_grads(model, fst.MatryoshkaLoss(
        model, fst.CachedMultipleNegativesRankingLoss(model, mini_batch_size=4), dims), features)
    theirs = loss_and_grads(model, st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model),
                                                            dims), features)
    assert sweeps == [[(4, 1.0), (8, 1.0), (16, 1.0)]]
    for name in ["loss", *reference[1]]:
        ref, a, b = ((v if name == "loss" else g[name]) for v, g in (reference, ours, theirs))
        err, own = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert err <= 2 * own + 1e-7, f"{name}: fastcl float32 error {err:.3g}, sentence-transformers' {own:.3g}"


# MultiVectorMultipleNegativesRankingLoss: a tiny MultiVectorEncoder (token embeddings, then
# sentence-transformers' MultiVectorMask dropping two skiplist words from the documents)

class TinyTokenEncoder(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB), DIM)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.proj = nn.Linear(DIM, DIM)
        self.tokenizer = _tokenizer()
        self.max_seq_length = 8

    def forward(self, features):
        features["token_embeddings"] = self.proj(self.drop(torch.tanh(self.emb(features["input_ids"]))))
        return features

    def get_embedding_dimension(self) -> int:
        return DIM

    def preprocess(self, inputs, **kwargs):
        return TinyEncoder.preprocess(self, inputs, **kwargs)


def tiny_multi_vector_model(seed: int, similarity_fn_name: str = "maxsim", dropout: float = 0.0):
    from sentence_transformers.multi_vector_encoder.model import MultiVectorEncoder
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    torch.manual_seed(seed)
    return MultiVectorEncoder(modules=[TinyTokenEncoder(dropout), MultiVectorMask(skiplist_words=["w3", "w4"])],
                              device="cpu", similarity_fn_name=similarity_fn_name).double()


def _lift_st_float32_cast(setattr=setattr):
    """sentence-transformers' MaxSim scores without their float32 cast (its ``.float()`` removed from
    its own source, nothing else changed), so that its loss runs in float64 like fastcl's."""
    import inspect

    from sentence_transformers.multi_vector_encoder.scoring import colbert
    from sentence_transformers.util import similarity

    if getattr(similarity._maxsim_score_documents, "lifted", False):
        return
    source = inspect.getsource(similarity._maxsim_score_documents)
    lifted = source.replace("scores.max(dim=-1).values.float()", "scores.max(dim=-1).values")
    assert lifted != source, "sentence-transformers' MaxSim changed: update the fixture"
    namespace = dict(vars(similarity))
    exec(lifted, namespace)  # noqa: S102 - sentence-transformers' own function, one cast removed
    namespace["_maxsim_score_documents"].lifted = True
    for module in (similarity, colbert):
        setattr(module, "_maxsim_score_documents", namespace["_maxsim_score_documents"])


@pytest.fixture
def st_scores_in_float64(monkeypatch):
    _lift_st_float32_cast(monkeypatch.setattr)


def multi_vector_similarities():
    from functools import partial

    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores, mean_colbert_scores

    return [pytest.param(None, "maxsim", id="model-maxsim"), pytest.param(None, "meanmaxsim", id="model-meanmaxsim"),
            pytest.param(colbert_scores, "maxsim", id="colbert_scores"),
            pytest.param(mean_colbert_scores, "maxsim", id="mean_colbert_scores"),
            pytest.param(partial(colbert_scores, chunk_elements=5000, length_normalize=True), "maxsim",
                         id="partial")]


@pytest.mark.parametrize("similarity_fct,fn_name", multi_vector_similarities())
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("scale,mini_batch_size", [(1.0, None), (4.0, 3)])
@pytest.mark.parametrize("backend", ["reference", "chunked", "cpu"])
def test_multi_vector_mnrl_equals_sentence_transformers(st_scores_in_float64, backend, similarity_fct, fn_name,
                                                        negatives, scale, mini_batch_size):
    """Hard-negative columns, both model similarities and the scorers fastcl maps, embedding chunks
    (``mini_batch_size``) and score chunks (``score_mini_batch_size``, which changes nothing in fastcl)."""
    model = tiny_multi_vector_model(7, fn_name)
    kw = dict(scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size, score_mini_batch_size=4)
    ours = fst.MultiVectorMultipleNegativesRankingLoss(model, **kw, backend=backend)
    theirs = st.multi_vector_encoder.losses.MultiVectorMultipleNegativesRankingLoss(model, **kw)
    value = assert_same(model, ours, theirs, batch(2 + negatives, 7, seed=7))
    assert value.dtype == torch.float64


def test_multi_vector_mnrl_float32_config_and_refusals():
    """sentence-transformers as shipped (its scores float32) on a float32 model: the same loss and
    gradients to float32 round-off, a float32 loss; the same config and citation; XTR refused."""
    from sentence_transformers.multi_vector_encoder import losses as mv_losses
    from sentence_transformers.multi_vector_encoder.scoring import XTRScores

    model = tiny_multi_vector_model(8).float()
    ours = fst.MultiVectorMultipleNegativesRankingLoss(model, scale=2.0)
    theirs = mv_losses.MultiVectorMultipleNegativesRankingLoss(model, scale=2.0)
    value = assert_same(model, ours, theirs, batch(3, 9, seed=8), rtol=1e-5, atol=1e-6)
    assert value.dtype == torch.float32
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation
    with pytest.raises(NotImplementedError, match="similarity_fct=XTRScores"):
        fst.MultiVectorMultipleNegativesRankingLoss(model, similarity_fct=XTRScores())
    with pytest.raises(ValueError, match="Scale must be a positive"):  # sentence-transformers' own check
        fst.MultiVectorMultipleNegativesRankingLoss(model, scale=0.0)


# CachedMultiVectorMultipleNegativesRankingLoss: fastcl.cached_loss over the same tiny MultiVectorEncoder


def ragged_columns(columns: int, rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``batch``'s columns cut to different token widths (6, 5, 4...): chunks are padded per column."""
    return [{k: v[:, :6 - i] for k, v in column.items()} for i, column in enumerate(batch(columns, rows, seed))]


@pytest.mark.parametrize("similarity_fct,fn_name", multi_vector_similarities())
@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_cached_multi_vector_mnrl_equals_sentence_transformers(st_scores_in_float64, backend, similarity_fct, fn_name,
                                                               negatives):
    """7 rows in chunks of 3 (3, 3, 1), columns of different widths, scale 3: the loss and every
    gradient equal to sentence-transformers' cached loss and to the plain multi-vector loss (fastcl's and
    sentence-transformers'), float64, 1e-10 relative; under no_grad (evaluation) the same value."""
    model = tiny_multi_vector_model(12, fn_name)
    kw = dict(scale=3.0, similarity_fct=similarity_fct)
    features = ragged_columns(2 + negatives, 7, seed=12)
    ours = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, score_mini_batch_size=2,
                                                             backend=backend, **kw)
    mv = st.multi_vector_encoder.losses
    tol = dict(rtol=1e-10, atol=1e-12)
    value = assert_same(model, ours, mv.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, **kw),
                        features, **tol)
    assert value.dtype == torch.float64
    assert_same(model, ours, mv.MultiVectorMultipleNegativesRankingLoss(model, **kw), features, **tol)
    assert_same(model, ours, fst.MultiVectorMultipleNegativesRankingLoss(model, **kw, backend=backend), features, **tol)
    with torch.no_grad():
        torch.testing.assert_close(ours([dict(f) for f in features], None), value, rtol=1e-12, atol=0)


def test_cached_multi_vector_mnrl_follows_a_stamped_task(st_scores_in_float64):
    """A collator's ``"task"`` wins over the column's position, in both passes: queries embedded as
    documents lose the skiplist words ``w3``/``w4`` (MultiVectorMask), and the loss moves with it."""
    model = tiny_multi_vector_model(13)
    features = ragged_columns(3, 7, seed=13)
    features[0]["input_ids"][:, 0] = VOCAB["w3"]  # every query starts with a skiplist word
    stamped = [{**features[0], "task": "document"}, *features[1:]]
    mv = st.multi_vector_encoder.losses
    ours = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, scale=2.0)
    value = assert_same(model, ours, mv.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3,
                                                                                      scale=2.0),
                        stamped, rtol=1e-10, atol=1e-12)
    unstamped, _ = loss_and_grads(model, ours, features)
    assert (value - unstamped).abs() > 1e-3


def test_cached_multi_vector_mnrl_replays_dropout():
    """Dropout on (the model in training mode): fastcl's cached loss, chunks of 3 over 7 rows, draws
    the dropout masks of the plain multi-vector loss's forward (the same draws in the same order) and
    replays them in its second pass: the same loss and gradients, float64, 1e-10 relative.
    (sentence-transformers' own cached loss cuts each chunk's padding first, so its chunks draw other
    masks than its plain loss: not compared here.)"""
    model = tiny_multi_vector_model(14, dropout=0.3).train()
    features = batch(3, 7, seed=14)  # one token width: the plain loss's merged documents draw in the same order
    ours = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, scale=2.0)
    plain = fst.MultiVectorMultipleNegativesRankingLoss(model, scale=2.0)
    (v, g), (v2, g2) = [(torch.manual_seed(5), loss_and_grads(model, loss, features))[1] for loss in (ours, plain)]
    torch.testing.assert_close(v, v2, rtol=1e-10, atol=0)
    assert g.keys() == g2.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g2[name], rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    model.eval()
    assert (loss_and_grads(model, ours, features)[0] - v).abs() > 1e-3  # dropout changed the loss


class _TokensPassThrough(nn.Module):
    """No parameters: the features' own ``token_embeddings`` (leaves requiring grad) are the output."""
    similarity_fn_name = "maxsim"

    def forward(self, features, task=None):
        return {"token_embeddings": features["token_embeddings"], "attention_mask": features["attention_mask"]}


def test_cached_multi_vector_mnrl_reaches_inputs_that_require_grad():
    """A model without trainable parameters fed embeddings that require grad (sentence-transformers'
    own tests do this): the second pass still runs and the inputs get the plain loss's gradients."""
    g = torch.Generator().manual_seed(18)

    def columns():
        g.manual_seed(18)
        return [{"token_embeddings": torch.randn(5, 4 + i, 8, generator=g, dtype=torch.float64).requires_grad_(),
                 "attention_mask": torch.rand(5, 4 + i, generator=g) < 0.8} for i in range(3)]

    grads = []
    for loss in (fst.CachedMultiVectorMultipleNegativesRankingLoss(_TokensPassThrough(), mini_batch_size=2),
                 fst.MultiVectorMultipleNegativesRankingLoss(_TokensPassThrough())):
        features = columns()
        loss(features, None).backward()
        grads.append([f["token_embeddings"].grad for f in features])
    for ours, plain in zip(*grads):
        assert ours is not None and ours.abs().sum() > 0
        torch.testing.assert_close(ours, plain, rtol=1e-10, atol=1e-12)


def test_cached_multi_vector_mnrl_config_and_refusals():
    from sentence_transformers.multi_vector_encoder import losses as mv_losses
    from sentence_transformers.multi_vector_encoder.scoring import XTRScores, mean_colbert_scores

    model = tiny_multi_vector_model(15).float()
    kw = dict(scale=4.0, similarity_fct=mean_colbert_scores, mini_batch_size=5, score_mini_batch_size=2)
    ours = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, **kw)
    theirs = mv_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, **kw)
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation
    assert type(ours).uses_gradient_cache is True
    # sentence-transformers as shipped (float32 scores) on a float32 model: float32 round-off
    value = assert_same(model, ours, theirs, batch(3, 9, seed=15), rtol=1e-5, atol=1e-6)
    assert value.dtype == torch.float32
    with pytest.raises(NotImplementedError, match="mini_batch_num_tokens"):
        fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_num_tokens=128)
    with pytest.raises(ValueError):  # sentence-transformers' own check comes first
        fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_num_tokens=0)
    with pytest.raises(NotImplementedError, match="similarity_fct=XTRScores"):
        fst.CachedMultiVectorMultipleNegativesRankingLoss(model, similarity_fct=XTRScores())
    with pytest.raises(ValueError, match="Scale must be a positive"):
        fst.CachedMultiVectorMultipleNegativesRankingLoss(model, scale=0.0)
    flattened = batch(2, 4, seed=15)
    flattened[1]["pixel_values"] = torch.zeros(11, 3)  # a VLM's patches of every image, one flat tensor
    with pytest.raises(NotImplementedError, match="flattened inputs"):
        ours(flattened, None)


def _mv_matryoshka_pair(kind: str, model, similarity_fct, dims, weights, **kw):
    """(fastcl's, sentence-transformers') MultiVectorMatryoshkaLoss around the ``kind`` loss."""
    mv = st.multi_vector_encoder.losses
    base = dict(scale=3.0, similarity_fct=similarity_fct)
    if kind == "cached":
        ours = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, **base)
        theirs = mv.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3, **base)
    else:
        ours = fst.MultiVectorMultipleNegativesRankingLoss(model, **base)
        theirs = mv.MultiVectorMultipleNegativesRankingLoss(model, **base)
    return (fst.MultiVectorMatryoshkaLoss(model, ours, dims, weights, **kw),
            mv.MultiVectorMatryoshkaLoss(model, theirs, dims, weights, **kw))


@pytest.mark.parametrize("kind", ["plain", "cached"])
@pytest.mark.parametrize("similarity_fct,fn_name", multi_vector_similarities()[1:4])
@pytest.mark.parametrize("weights", [None, (1.0, 0.5, 0.25)])
def test_multi_vector_matryoshka_equals_sentence_transformers(st_scores_in_float64, kind, similarity_fct, fn_name,
                                                              weights):
    """Around the plain and the cached loss (chunks of 3 over 7 rows, columns 6/5/4 tokens wide, one
    hard-negative column), dims 16, 4, 8: the loss and every gradient equal to sentence-transformers'
    MultiVectorMatryoshkaLoss around its own loss of the same kind (float64, 1e-10)."""
    model = tiny_multi_vector_model(16, fn_name)
    ours, theirs = _mv_matryoshka_pair(kind, model, similarity_fct, (16, 4, 8), weights)
    assert_same(model, ours, theirs, ragged_columns(3, 7, seed=16), rtol=1e-10, atol=1e-12)
    assert ours.get_config_dict() == theirs.get_config_dict() and ours.citation == theirs.citation


def test_multi_vector_matryoshka_dims_per_step_and_refusals(st_scores_in_float64):
    model = tiny_multi_vector_model(17)
    features = ragged_columns(2, 7, seed=17)
    dims = [16, 12, 8, 4]
    for kind in ("plain", "cached"):
        ours, theirs = _mv_matryoshka_pair(kind, model, None, dims, None, n_dims_per_step=2)
        for seed in range(3):  # the same Python random draws pick the same dimensions
            random.seed(seed)
            v1, g1 = loss_and_grads(model, ours, features)
            random.seed(seed)
            v2, g2 = loss_and_grads(model, theirs, features)
            torch.testing.assert_close(v1, v2, rtol=1e-10, atol=0)
            for name in g1:
                torch.testing.assert_close(g1[name], g2[name], rtol=1e-10, atol=1e-12)
    mv = st.multi_vector_encoder.losses
    with pytest.raises(TypeError, match="sentence-transformers' own MultiVectorMatryoshkaLoss"):
        fst.MultiVectorMatryoshkaLoss(model, mv.MultiVectorMultipleNegativesRankingLoss(model), dims)
    # sentence-transformers' own wrapper decorates a calculate_loss that fastcl's cached loss never calls
    cached = fst.CachedMultiVectorMultipleNegativesRankingLoss(model, mini_batch_size=3)
    with pytest.raises(NotImplementedError, match="MultiVectorMatryoshkaLoss"):
        mv.MultiVectorMatryoshkaLoss(model, cached, dims)([dict(f) for f in features], None)


@pytest.mark.parametrize("ours,theirs", [
    pytest.param(lambda m: fst.CachedMultiVectorMultipleNegativesRankingLoss(m, mini_batch_size=3, scale=2.0),
                 lambda m: st.multi_vector_encoder.losses.MultiVectorMultipleNegativesRankingLoss(m, scale=2.0),
                 id="cached"),
    pytest.param(lambda m: fst.MultiVectorMatryoshkaLoss(
        m, fst.CachedMultiVectorMultipleNegativesRankingLoss(m, mini_batch_size=3, scale=2.0), [16, 8]),
                 lambda m: st.multi_vector_encoder.losses.MultiVectorMatryoshkaLoss(
        m, st.multi_vector_encoder.losses.MultiVectorMultipleNegativesRankingLoss(m, scale=2.0), [16, 8]),
                 id="matryoshka-cached")])
def test_multi_vector_encoder_trainer(tmp_path, monkeypatch, ours, theirs):
    """3 steps of ``MultiVectorEncoderTrainer`` (its collator, sampler, AdamW, scheduler; float32,
    dropout off: the plain loss pads merged columns to one width, so its draws would differ) on
    (query, positive, negative) texts: fastcl's cached loss leaves the parameters where
    sentence-transformers' plain multi-vector loss (and its Matryoshka) leaves them."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import MultiVectorEncoderTrainer, MultiVectorEncoderTrainingArguments

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rng = random.Random(1)
    texts = {column: [" ".join(f"w{rng.randrange(40)}" for _ in range(rng.randint(2, 6))) for _ in range(21)]
             for column in ("query", "positive", "negative")}
    dataset = datasets.Dataset.from_dict(texts)

    def train(make_loss, run: str):
        model = tiny_multi_vector_model(19).float()
        args = MultiVectorEncoderTrainingArguments(
            output_dir=str(tmp_path / run), per_device_train_batch_size=7, max_steps=3, learning_rate=1e-2,
            seed=0, report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = MultiVectorEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=make_loss(model))
        trainer.train()
        return dict(model.named_parameters()), trainer.state.global_step

    (mine, steps), (reference, _) = train(ours, "fastcl"), train(theirs, "sentence-transformers")
    assert steps == 3
    start = dict(tiny_multi_vector_model(19).float().named_parameters())
    for name, p in mine.items():
        assert not torch.equal(p, start[name]), f"{name} did not move"
        torch.testing.assert_close(p, reference[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


# gather_across_devices=True on 2 gloo ranks: each rank's loss and gradients against sentence-transformers'
# own (its all_gather_with_grad) on the same rank

GATHER_CASES = {
    **{f"mnrl-{'+'.join(d)}-{p}-neg{n}": ("mnrl", dict(directions=d, partition_mode=p), n)
       for d, p in DIRECTIONS for n in (0, 2)},
    "mnrl-dot": ("mnrl", dict(scale=1.0, similarity_fct=st_util.dot_score), 1),
    "cached-mnrl": ("cached", dict(mini_batch_size=3), 1),
    "cached-mnrl-gte": ("cached", dict(mini_batch_size=3, directions=(QD, QQ, DQ, DD)), 1),
    "matryoshka-mnrl": ("matryoshka", {}, 1),
    "multi-vector": ("multi-vector", dict(scale=2.0), 2),
    "multi-vector-meanmaxsim": ("multi-vector", dict(scale=5.0, similarity_fct="mean_colbert_scores"), 1),
    "cached-multi-vector": ("cached-multi-vector", dict(scale=2.0, mini_batch_size=2), 2),
    "cached-multi-vector-meanmaxsim": ("cached-multi-vector", dict(scale=5.0, similarity_fct="mean_colbert_scores",
                                                                   mini_batch_size=3), 1),
    "matryoshka-cached-multi-vector": ("matryoshka-cached-multi-vector", dict(scale=2.0, mini_batch_size=2), 1),
    **{f"gist-{a}-{p}-neg{n}": ("gist", dict(temperature=0.05, margin=0.1, contrast_anchors=a == "anchors",
                                             contrast_positives=p == "positives"), n)
       for a in ("anchors", "no-anchors") for p in ("positives", "no-positives") for n in (0, 1)},
    # margin 0.1 throughout: at margin 0 this batch's hard negative [7, 5] is the bag of words of the
    # positive [5, 7] (a guide tie at the threshold, decided by rounding: sentence-transformers keeps it)
    "cached-gist": ("cached-gist", dict(temperature=0.05, margin=0.1, mini_batch_size=3), 1),
    "matryoshka-gist": ("matryoshka-gist", dict(temperature=0.05, margin=0.1), 1),
}
LOCAL_ROWS = 5


def _gather_losses(kind: str, model, kw: dict, gather: bool = True):
    """(fastcl's, sentence-transformers') loss with gather_across_devices=``gather``."""
    kw = dict(kw, gather_across_devices=gather)
    if kind.endswith("gist"):
        guide = tiny_model(3)
        plain = {k: v for k, v in kw.items() if k != "mini_batch_size"}
        if kind == "cached-gist":
            return fst.CachedGISTEmbedLoss(model, guide, **kw), st_losses.GISTEmbedLoss(model, guide, **plain)
        if kind == "matryoshka-gist":
            return (fst.MatryoshkaLoss(model, fst.GISTEmbedLoss(model, guide, **kw), [16, 8]),
                    st_losses.MatryoshkaLoss(model, st_losses.GISTEmbedLoss(model, guide, **kw), [16, 8]))
        return fst.GISTEmbedLoss(model, guide, **kw), st_losses.GISTEmbedLoss(model, guide, **kw)
    if kind == "cached":
        return fst.CachedMultipleNegativesRankingLoss(model, **kw), st_losses.MultipleNegativesRankingLoss(
            model, **{k: v for k, v in kw.items() if k != "mini_batch_size"})
    if kind == "multi-vector":
        from sentence_transformers.multi_vector_encoder import losses as mv_losses

        return (fst.MultiVectorMultipleNegativesRankingLoss(model, **kw),
                mv_losses.MultiVectorMultipleNegativesRankingLoss(model, **kw))
    if kind.endswith("cached-multi-vector"):
        from sentence_transformers.multi_vector_encoder import losses as mv_losses

        ours, theirs = (fst.CachedMultiVectorMultipleNegativesRankingLoss(model, **kw),
                        mv_losses.CachedMultiVectorMultipleNegativesRankingLoss(model, **kw))
        if kind.startswith("matryoshka"):
            return (fst.MultiVectorMatryoshkaLoss(model, ours, [16, 8]),
                    mv_losses.MultiVectorMatryoshkaLoss(model, theirs, [16, 8]))
        return ours, theirs
    if kind == "matryoshka":
        return (fst.MatryoshkaLoss(model, fst.MultipleNegativesRankingLoss(model, **kw), [16, 8]),
                st_losses.MatryoshkaLoss(model, st_losses.MultipleNegativesRankingLoss(model, **kw), [16, 8]))
    return fst.MultipleNegativesRankingLoss(model, **kw), st_losses.MultipleNegativesRankingLoss(model, **kw)


def _gather_rank(rank: int, world: int) -> dict:
    """Every case on this rank: its rows of a global batch; max |fastcl - sentence-transformers| over
    the loss and every parameter gradient, and how far the loss is from this rank's loss without
    the gather (or the error's text)."""
    import traceback

    out = {}
    for name, (kind, kw, negatives) in GATHER_CASES.items():
        try:
            if kind.endswith("multi-vector"):
                from sentence_transformers.multi_vector_encoder.scoring import mean_colbert_scores

                _lift_st_float32_cast()  # as st_scores_in_float64, in this rank's process
                model = tiny_multi_vector_model(11)
                kw = {k: mean_colbert_scores if v == "mean_colbert_scores" else v for k, v in kw.items()}
            else:
                model = tiny_model(11)
            mine = slice(rank * LOCAL_ROWS, (rank + 1) * LOCAL_ROWS)
            width = 6 - rank if kind.endswith("multi-vector") else 6  # token widths differ between ranks: padded
            features = [{k: v[mine, :width] for k, v in column.items()}
                        for column in batch(2 + negatives, world * LOCAL_ROWS, seed=11)]
            ours, theirs = _gather_losses(kind, model, kw)
            v1, g1 = loss_and_grads(model, ours, features)
            v2, g2 = loss_and_grads(model, theirs, features)
            assert g1.keys() == g2.keys() and g1
            local = loss_and_grads(model, _gather_losses(kind, model, kw, gather=False)[0], features)[0]
            out[name] = (max([(v1 - v2).abs().item()] + [(g1[n] - g2[n]).abs().max().item() for n in g1]),
                         (v1 - local).abs().item())
        except Exception:  # noqa: BLE001 - reported by the test in the parent
            out[name] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def gather_results():
    from fastcl.distributed._spawn import run_ranks

    return run_ranks(_gather_rank, 2, 240, env={"HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("case", list(GATHER_CASES))
def test_gather_across_devices_equals_sentence_transformers(gather_results, case):
    for rank, results in enumerate(gather_results):
        assert not isinstance(results[case], str), f"rank {rank}:\n{results[case]}"
        err, gathered = results[case]
        assert err < 1e-10, f"rank {rank}: max |fastcl - sentence-transformers| = {err:.3g}"
        assert gathered > 1e-3, f"rank {rank}: the gather changed the loss by {gathered:.3g} only"
