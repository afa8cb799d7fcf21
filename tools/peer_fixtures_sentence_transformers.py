"""Offline stand-ins for the Hub models of sentence-transformers' test fixtures (tools/peer_tests.py).

tools/peer_tests.py writes this file as ``tests/sentence_transformer/conftest.py`` beside
sentence-transformers' own ``tests/conftest.py``: pytest takes the nearer conftest's fixture, so these
replace the ones that download (``stsb_bert_tiny_model``: sentence-transformers-testing/stsb-bert-tiny-safetensors;
``static_retrieval_mrl_en_v1_model``: sentence-transformers/static-retrieval-mrl-en-v1; ``tokenizer``:
google-bert/bert-base-uncased's, which ``static_embedding`` uses with ``embedding_weights``) with
randomly initialised models of the same shapes, built here: a BERT-tiny (2 layers, hidden 128, 2
heads, mean pooling) and a 1024-dimensional StaticEmbedding. The tokenizer is a BERT WordPiece over
single characters, so every lowercase text gets ids of its own. None of the tests run asserts values
of the pretrained weights (with sentence-transformers' own classes they pass on these but for the
failures tools/peer_tests.py lists).
"""
from __future__ import annotations

import string
from copy import deepcopy

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Pooling, StaticEmbedding, Transformer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, BertTokenizerFast

CHARS = string.ascii_lowercase + string.digits + string.punctuation
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *(f"##{c}" for c in CHARS)]


def _wordpiece() -> Tokenizer:
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return _wordpiece()


@pytest.fixture
def embedding_weights():
    return np.random.rand(len(VOCAB), 64).astype(np.float32)


@pytest.fixture(scope="session")
def _stsb_bert_tiny_model(tmp_path_factory) -> SentenceTransformer:
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=512, max_position_embeddings=512)
    BertModel(config).save_pretrained(path)
    BertTokenizerFast(tokenizer_object=_wordpiece(), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    transformer = Transformer(str(path), max_seq_length=64)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension(), "mean")],
                                device="cpu")
    model.model_card_data.generate_widget_examples = False
    return model


@pytest.fixture(scope="session")
def _static_retrieval_mrl_en_v1_model(tokenizer) -> SentenceTransformer:
    torch.manual_seed(0)
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=1024)], device="cpu")


@pytest.fixture()
def stsb_bert_tiny_model(_stsb_bert_tiny_model) -> SentenceTransformer:
    return deepcopy(_stsb_bert_tiny_model)


@pytest.fixture()
def static_retrieval_mrl_en_v1_model(_static_retrieval_mrl_en_v1_model) -> SentenceTransformer:
    return deepcopy(_static_retrieval_mrl_en_v1_model)
