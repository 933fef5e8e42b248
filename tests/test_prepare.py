"""Tokenizing in the prepare step: the fast path must give exactly transformers' token ids."""

import pytest
from tokenizers import processors

from lmbatch.models import build_tokenizer
from lmbatch.prepare import encode, load_tokenizer

TEXTS = ["Hello there", "", "  spaces  and\nnewlines\t", "<s> a literal special token </s>",
         "ünïcödé and emoji 🚀", "word " * 300]


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tmp_path_factory):
    """A saved tokenizer that adds <s> through its post-processor and carries a truncation setting."""
    tokenizer = build_tokenizer()
    backend = tokenizer.backend_tokenizer
    bos = tokenizer.bos_token_id
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    backend.enable_truncation(max_length=16)  # saved in tokenizer.json; transformers' call ignores it
    path = tmp_path_factory.mktemp("bos-tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_the_transformers_call(bos_tokenizer_dir, add_special_tokens):
    tokenizer = load_tokenizer.__wrapped__(bos_tokenizer_dir)  # fresh: nothing called on it yet
    got = encode(tokenizer, TEXTS, add_special_tokens)
    expected = tokenizer(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
    assert got == expected
    assert (expected[0][0] == tokenizer.bos_token_id) == add_special_tokens
    assert len(expected[-1]) > 16  # the saved truncation is not applied
