"""fastcl.integrations.sentence_transformers' multi-vector losses against sentence-transformers' own:
``MultiVectorMultipleNegativesRankingLoss``, its cached form and ``MultiVectorMatryoshkaLoss`` on a tiny
``MultiVectorEncoder`` (loss and gradients in float64; config, refusals; 3 steps of
``MultiVectorEncoderTrainer``). Their 2-rank gather cases are in test_integrations_sentence_transformers.py."""
import random

import pytest
import torch
from torch import nn

st = pytest.importorskip("sentence_transformers")
from fastcl.integrations import sentence_transformers as fst  # noqa: E402
from st_tiny_models import VOCAB, _lift_st_float32_cast, assert_same, batch, loss_and_grads, tiny_multi_vector_model  # noqa: E402


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
