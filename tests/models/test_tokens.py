"""Tokenizing in the prepare step: the fast path must give exactly transformers' token ids."""

import json
import subprocess
import sys

import pytest
from tokenizers import processors

from lmbatch.models import build_tokenizer
from lmbatch.models.tokens import direct_class_path, encode, load_tokenizer

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


@pytest.fixture(scope="module", params=["TokenizersBackend", "GPT2Tokenizer", "Qwen2Tokenizer"])
def declared_tokenizer_dir(request, tmp_path_factory):
    """A saved tokenizer whose tokenizer_config.json names a class, as a real model's does."""
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save_pretrained(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": request.param}))
    return str(path)


def test_workers_load_autotokenizers_choice_directly_without_torch(declared_tokenizer_dir):
    auto = load_tokenizer.__wrapped__(declared_tokenizer_dir)
    class_path = direct_class_path(auto, declared_tokenizer_dir)
    assert class_path == f"{type(auto).__module__}:{type(auto).__name__}"
    direct = load_tokenizer.__wrapped__(declared_tokenizer_dir, class_path=class_path)
    chat = [{"role": "user", "content": "hi"}]
    assert type(direct) is type(auto)
    assert encode(direct, TEXTS, True) == encode(auto, TEXTS, True)
    assert direct.apply_chat_template(chat, tokenize=False) == auto.apply_chat_template(chat, tokenize=False)
    # What a prepare worker does, in a fresh process: no torch import (AutoTokenizer's brings it in).
    worker = (f"import sys; from lmbatch.models.tokens import load_tokenizer, encode; "
              f"t = load_tokenizer({declared_tokenizer_dir!r}, class_path={class_path!r}); encode(t, ['a b'], True); "
              f"t.apply_chat_template({chat!r}, tokenize=False); print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_tokenizer_the_direct_load_would_not_reproduce_keeps_autotokenizer(declared_tokenizer_dir):
    changed = load_tokenizer.__wrapped__(declared_tokenizer_dir)
    changed.chat_template = "{{ messages[0]['content'] }}"  # differs from what the directory holds
    assert direct_class_path(changed, declared_tokenizer_dir) is None

    class RemoteCode(type(changed)):  # a class outside transformers, as trust_remote_code loads
        pass
    assert direct_class_path(RemoteCode.from_pretrained(declared_tokenizer_dir), declared_tokenizer_dir) is None
