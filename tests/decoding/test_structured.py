"""Structured output (generation.json_schema, generation.regex) against an oracle of its own:
model.generate on each prompt alone under transformers' `prefix_allowed_tokens_fn`, allowing the
tokens after which the decoded text can still match the pattern (a partial match of the `regex`
module, which transformers installs) and an EOS once it matches whole. The oracle uses no
outlines-core. Patterns here are ASCII, so a token is allowed on its own decoded text.
"""

import json

import pytest
import regex
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from helpers.data import varied_prompts
from lmbatch.config import BatchingConfig, ConfigError, GenerationOptions, ModelConfig
from lmbatch.decoding.structured import PatternError, pattern, token_bytes
from lmbatch.engine.hf import HFEngine
from lmbatch.engine.types import Request, SamplingParams

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
          "required": ["label", "sure"]}
SENTENCE = r"(yes|no), [0-9]{1,3} (apples|pears)\."


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def engine(request):
    path = request.getfixturevalue(request.param)
    return HFEngine.load(path, ModelConfig(path=path, dtype="float32"), BatchingConfig(), device="cpu")


def pattern_oracle(engine, request: Request):
    """The row's completion from model.generate on its prompt alone, held to its pattern by transformers."""
    tok = engine.tokenizer
    eos = min(engine.eos_ids)
    texts = {i: tok.decode([i]) for i in range(len(tok)) if i not in set(tok.all_special_ids)}
    expression = regex.compile(request.pattern)
    start = len(request.prompt_ids)

    def allowed(_, sequence):
        text = tok.decode(sequence[start:].tolist())
        tokens = [i for i, t in texts.items() if expression.fullmatch(text + t, partial=True)]
        return tokens + [eos] if expression.fullmatch(text) else tokens

    out = engine.model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                                do_sample=False, pad_token_id=engine.pad_id, eos_token_id=eos,
                                prefix_allowed_tokens_fn=allowed, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, start:].tolist()
    completion = engine.texts.finish(request, 0, tokens)
    # the model's own log-probability of each token (its raw logits), the EOS that ends the row left out
    completion.logprob = sum(step[0].float().log_softmax(-1)[t].item() for step, t in zip(out.logits, tokens[:-1]))
    return completion


def test_rows_held_to_a_schema_or_a_regex_answer_as_generate_alone_held_to_it(engine):
    """Rows held to a JSON schema (with outlines-core's whitespace, or none: generation.json_whitespace), to
    a regex, and free rows, in shared micro-batches: each held row's completion is the oracle's, and its
    text is valid JSON of the schema / matches the regex whole."""
    schema = pattern(GenerationOptions(json_schema=SCHEMA))
    compact = pattern(GenerationOptions(json_schema=SCHEMA, json_whitespace=""))
    prompts = varied_prompts(12, seed=4, max_words=40)
    kinds = [schema, SENTENCE, None, compact] * 3
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 40, pattern=k)
                for i, (p, k) in enumerate(zip(prompts, kinds))]
    got = sorted(engine.generate(requests), key=lambda c: c.key)
    assert engine.stats.micro_batches < len(requests)  # rows of each kind shared micro-batches
    for r, c in zip(requests, got):
        if r.pattern is None:
            continue
        expected = pattern_oracle(engine, r)
        assert (c.text, c.num_generated_tokens, c.finish_reason) == (
            expected.text, expected.num_generated_tokens, "stop"), r.key
        if r.pattern == SENTENCE:
            assert regex.fullmatch(SENTENCE, c.text)
        else:
            answer = json.loads(c.text)
            assert " " not in c.text if r.pattern == compact else True
            assert set(answer) == {"label", "sure"} and answer["label"] in ("yes", "no", "maybe")
            assert isinstance(answer["sure"], bool)


def test_sampled_rows_keep_to_their_pattern(engine):
    """Sampled, two samples a row (a guide each): every text matches, and they do not all agree."""
    params = SamplingParams(do_sample=True, temperature=3.0, num_return_sequences=2)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 30, params, seed=i, pattern=SENTENCE)
                for i, p in enumerate(varied_prompts(8, seed=6, max_words=20))]
    got = engine.generate(requests)
    assert len(got) == 16 and all(c.finish_reason == "stop" and regex.fullmatch(SENTENCE, c.text) for c in got)
    assert len({c.text for c in got}) > 2


def test_a_pattern_that_cannot_be_followed_is_its_rows_error(engine):
    prompts = varied_prompts(3, seed=7, max_words=10)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 8, pattern=k)
                for i, (p, k) in enumerate(zip(prompts, ["(ab", SENTENCE, None]))]
    got = sorted(engine.generate(requests), key=lambda c: c.key)
    assert got[0].finish_reason == "error" and got[0].error.startswith("invalid parameter: the pattern '(ab' cannot")
    assert [c.finish_reason != "error" for c in got[1:]] == [True, True]


def test_logprobs_of_a_held_row_are_the_models_own(engine):
    """Holding a row to a pattern changes which tokens it may take, not the model's log-probability of them."""
    r = Request(0, engine.tokenizer("Reply in JSON:")["input_ids"], 40, SamplingParams(logprobs=True),
                pattern=pattern(GenerationOptions(json_schema=SCHEMA)))
    c, expected = engine.generate([r])[0], pattern_oracle(engine, r)
    assert (c.text, c.finish_reason) == (expected.text, "stop")
    assert c.logprob == pytest.approx(expected.logprob, abs=1e-4)


def test_token_bytes_of_a_byte_level_tokenizer_are_what_it_decodes(engine):
    tok = engine.tokenizer
    spelled = {i: b for b, ids in token_bytes(tok, engine.eos_ids).items() for i in ids}
    assert not set(spelled) & set(tok.all_special_ids)
    checked = 0
    for i, b in spelled.items():
        try:
            text = b.decode()
        except UnicodeDecodeError:  # a part of a character: no text of its own
            continue
        assert tok.decode([i]) == text, i
        checked += 1
    assert checked > 200


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer: "▁" for a space, and <0xNN> for the bytes it has no piece for."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "<0xC3>": 4, "▁hi": 5, "▁": 6, "h": 7, "i": 8, "hi": 9}
    tok = Tokenizer(models.BPE(vocab, [("h", "i"), ("▁", "hi")], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_token_bytes_of_sentencepiece_pieces():
    assert token_bytes(sentencepiece_tokenizer(), {2}) == {
        b"\n": [3], b"\xc3": [4], b" hi": [5], b" ": [6], b"h": [7], b"i": [8], b"hi": [9]}


def test_a_tokenizer_without_bytes_or_pieces_is_refused():
    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "hi": 1, "##s": 2}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(PatternError, match="needs a tokenizer whose tokens are bytes"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"), set())


def test_the_schema_and_regex_keys():
    assert GenerationOptions(json_schema='{"type": "integer"}').json_schema == {"type": "integer"}  # JSON text too
    assert pattern(GenerationOptions(json_schema={"type": "integer"})) == r"(-)?(0|[1-9][0-9]*)"
    assert pattern(GenerationOptions(regex="a+")) == "a+" and pattern(GenerationOptions()) is None
    between = {"type": "object", "properties": {"a": {"type": "boolean"}}}
    assert pattern(GenerationOptions(json_schema=between)) == r'\{([ ]?"a"[ ]?:[ ]?(true|false))?[ ]?\}'
    assert pattern(GenerationOptions(json_schema=between, json_whitespace="")) == r'\{("a":(true|false))?\}'
    lines = pattern(GenerationOptions(json_schema=between, json_whitespace=r"[\n ]*"))
    assert lines == r'\{([\n ]*"a"[\n ]*:[\n ]*(true|false))?[\n ]*\}'
    with pytest.raises(ConfigError, match="generation.json_schema is not JSON"):
        GenerationOptions(json_schema='{"type": ')
    with pytest.raises(ConfigError, match="must be a mapping"):
        GenerationOptions(json_schema=["integer"])
    with pytest.raises(ConfigError, match="generation.choices and generation.regex both say what a text may be"):
        GenerationOptions(choices=["a"], regex="a")
    with pytest.raises(PatternError, match="json_schema .* cannot be followed: Unsupported type: colour"):
        pattern(GenerationOptions(json_schema={"type": "colour"}))


def test_a_pattern_is_compiled_once_per_replica_even_one_that_fails(engine, monkeypatch):
    """A column may hold the same regex on every row, good or bad: each is compiled once."""
    import outlines_core

    from lmbatch.decoding.structured import Indexes

    compiled, real = [], outlines_core.Index

    def counted(regex, vocabulary):  # the real compile, counted
        compiled.append(regex)
        return real(regex, vocabulary)

    monkeypatch.setattr(outlines_core, "Index", counted)
    indexes = Indexes(engine.tokenizer, engine.eos_ids)
    for _ in range(3):
        indexes.index(SENTENCE)
        with pytest.raises(PatternError, match=r"^invalid parameter: the pattern '\(ab' cannot be followed"):
            indexes.index("(ab")
    assert compiled == [SENTENCE, "(ab"]
