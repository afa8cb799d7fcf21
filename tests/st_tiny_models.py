"""Tiny offline models, batches and comparisons for the sentence-transformers integration tests
(tests/test_integrations_sentence_transformers.py, tests/test_integrations_st_multi_vector.py): a
randomly initialised module and a word-level tokenizer built here; the caller imports
sentence-transformers first (``pytest.importorskip``)."""
import torch
from sentence_transformers import SentenceTransformer
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

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
