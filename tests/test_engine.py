"""The engine against the correctness oracle: model.generate on each prompt alone.

Runs in-process (no Ray) on both a rotary (Llama) and a learned-position (GPT-2) tiny model,
in float32: batched left-padded greedy output must equal unbatched output token for token.
"""

import collections
import json
import shutil

import pyarrow as pa
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import choice_oracle, save_classifier, save_headless, varied_prompts
from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.decoding.processors import PerRowSampler, RepetitionPenalty
from lmbatch.engine import hf as engine_module
from lmbatch.engine import scoring
from lmbatch.engine.hf import HFEngine
from lmbatch.engine.loading import choose_attention, choose_kv_cache, has_flash_attention
from lmbatch.engine.types import Completion, Pooling, Request, SamplingParams


def make_engine(path, kv_cache=None, **batching):
    return HFEngine.load(path, ModelConfig(path=path, dtype="float32", kv_cache=kv_cache), BatchingConfig(**batching),
                         device="cpu")


def alone(engine, request):
    """The oracle: this prompt alone, no padding, plain model.generate."""
    out = engine.model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                                do_sample=False, pad_token_id=engine.pad_id)
    return out[0, len(request.prompt_ids):].tolist()


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def model_path(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("strategy, kv_cache", [("bucketed", None), ("fixed", None),
                                               ("bucketed", "static")])  # static: the GPU default
def test_greedy_batched_equals_each_prompt_alone(model_path, strategy, kv_cache):
    engine = make_engine(model_path, kv_cache, strategy=strategy, max_batch_tokens=8192, fixed_batch_size=8)
    assert engine.kv_cache == (kv_cache or "dynamic")
    prompts = varied_prompts(36, seed=1)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 1 + (7 * i) % 20) for i, p in enumerate(prompts)]
    lengths = [len(r.prompt_ids) for r in requests]
    assert min(lengths) == 1 and max(lengths) >= 300  # 1 to several hundred tokens

    completions = {c.key: c for c in engine.generate(requests)}
    assert engine.stats.micro_batches > 1 and len(completions) == len(requests)
    for r in requests:
        expected = engine.texts.finish(r, 0, alone(engine, r))
        got = completions[r.key]
        assert (got.text, got.num_generated_tokens, got.finish_reason) == (
            expected.text, expected.num_generated_tokens, expected.finish_reason), f"row {r.key}"
        assert got.finish_reason in ("stop", "length")
        if got.finish_reason == "length":
            assert got.num_generated_tokens == r.max_new_tokens


def test_finish_reasons_and_stop_strings(tiny_llama):
    engine = make_engine(tiny_llama)
    runs = [engine.generate([Request(0, engine.tokenizer(p)["input_ids"], 24)])[0] for p in varied_prompts(8)]
    assert {r.finish_reason for r in runs} <= {"stop", "length"}
    ids, full = next((engine.tokenizer(p)["input_ids"], r) for p, r in zip(varied_prompts(8), runs)
                     if r.finish_reason == "length" and len(r.text) > 10)
    assert full.num_generated_tokens == 24
    # A plain-letters string the model is known to produce mid-output.
    at = next(i for i in range(4, len(full.text) - 3) if full.text[i:i + 3].isalpha() and full.text[i:i + 3].isascii())
    stop = full.text[at:at + 3]
    cut = engine.generate([Request(0, ids, 24, SamplingParams(stop=(stop,)))])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert 1 <= cut.num_generated_tokens < 24
    # The counted tokens are exactly those that produced the text up to and including the stop string.
    tokens = alone(engine, Request(0, ids, 24))[: cut.num_generated_tokens]
    assert stop in engine.texts.decode(tokens) and stop not in engine.texts.decode(tokens[:-1])


@pytest.fixture(scope="module")
def tiny_llama_without_pad(tiny_llama, tmp_path_factory):
    """The tiny model with no pad token, as GPT-2's and Llama 3's tokenizers come: the job pads with EOS."""
    return without_tokens(tiny_llama, tmp_path_factory.mktemp("no-pad") / "model", "pad")


def without_tokens(model, path, *kinds):
    """A copy of `model` whose tokenizer, config and generation config name no such special tokens."""
    shutil.copytree(model, path)
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        settings = json.loads((path / name).read_text())
        for kind in kinds:
            settings.pop(f"{kind}_token", None), settings.pop(f"{kind}_token_id", None)
        (path / name).write_text(json.dumps(settings))
    return str(path)


def test_a_tokenizer_without_pad_or_eos_pads_with_any_id(tiny_llama, tmp_path):
    """With neither a pad token nor an EOS to pad with, every micro-batch failed. Any id will do:
    padding is masked out. Rows then end only at their length (or a stop string)."""
    engine = make_engine(without_tokens(tiny_llama, tmp_path / "model", "pad", "eos"))
    assert engine.eos_ids == set() and engine.pad_id == 0
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 6) for i, p in enumerate(varied_prompts(8, max_words=20))]
    got = sorted(engine.generate(requests), key=lambda c: c.key)
    assert engine.stats.micro_batches < len(requests)
    for r, c in zip(requests, got):
        assert (c.text, c.finish_reason) == (engine.texts.decode(alone(engine, r)), "length"), f"row {r.key}"


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_llama_without_pad"])
def test_stop_strings_cut_rows_in_a_batch_as_alone(model, request):
    """A row that a stop string ends is padded while its neighbours go on; where the padding is
    EOS, the row's text was kept up to it, stop string and all (13 rows in 16 here)."""
    engine = make_engine(request.getfixturevalue(model))
    assert (engine.pad_id in engine.eos_ids) == (model == "tiny_llama_without_pad")
    params = SamplingParams(stop=("e",))
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 24, params)
                for i, p in enumerate(varied_prompts(16, seed=3, max_words=8))]
    batched = engine.generate(requests)
    assert engine.stats.micro_batches < len(requests)
    stopped = 0
    for r, got in zip(requests, sorted(batched, key=lambda c: c.key)):
        expected = engine.generate([r])[0]
        assert (got.text, got.num_generated_tokens, got.finish_reason) == (
            expected.text, expected.num_generated_tokens, expected.finish_reason), f"row {r.key}"
        stopped += "e" not in got.text and got.finish_reason == "stop" and got.num_generated_tokens < 24
    assert stopped >= 8


def test_stop_strings_are_checked_on_rows_still_going_and_confirmed_as_finish_cuts():
    """At every step only the rows still going are decoded (a row whose newest token is an EOS or the
    pad has ended), by the fast backend, and a match is confirmed with transformers' decode, which
    `_finish` cuts by: here its clean-up of spaces ("a ." -> "a.") removes what the backend's text has."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lmbatch.decoding.stopping import StopStrings

    vocab = {"[PAD]": 0, "[EOS]": 1, "a": 2, ".": 3, "b": 4, "[UNK]": 5}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                        pad_token="[PAD]", eos_token="[EOS]", clean_up_tokenization_spaces=True)
    assert tokenizer.backend_tokenizer.decode([2, 3]) == "a ." and tokenizer.decode([2, 3]) == "a."
    prompt = [4, 4]
    generated = [[4, 4, 2], [4, 4, 4], [2, 4, 0], [4, 2, 3], [4, 4, 3]]  # "b b a", ..., "b b ."
    ids = torch.tensor([prompt + g for g in generated])
    stopped = StopStrings(tokenizer, ("a", " ."), len(prompt), frozenset({0, 1}))(ids, None)
    # row 2 holds "a" but has ended (padded); row 4's " ." is in the backend's text only
    assert stopped.tolist() == [True, False, False, True, False]
    stopped = StopStrings(tokenizer, (" .",), len(prompt), frozenset({0, 1}))(ids, None)
    assert stopped.tolist() == [False] * 5


@pytest.mark.parametrize("do_sample", [False, True])
def test_a_row_with_choices_answers_with_exactly_one_as_transformers_constrained_generate_does(model_path, do_sample):
    """Rows with choices (one a prefix of another) beside free rows, batched: each constrained row's
    answer is that of model.generate on its prompt alone with transformers' own constraint, and is
    one of the choices (sampled too); free rows are untouched."""
    engine = make_engine(model_path, min_padding_efficiency=0, min_decode_efficiency=0)  # one micro-batch
    texts = ["positive", "negative", "yes", "yes please", "no"]
    choices = labels(engine, *texts)
    params = SamplingParams(do_sample=do_sample, temperature=5.0)
    prompts = varied_prompts(8, seed=5, max_words=12)
    needed = max(len(ids) for _, ids in choices) + 1  # as prepare sets it: the longest choice, then an EOS
    requests = [Request(i, engine.tokenizer(p)["input_ids"], needed if i % 4 else 6, params, seed=i,
                        choices=choices if i % 4 else ()) for i, p in enumerate(prompts)]
    got = sorted(engine.generate(requests), key=lambda c: c.key)
    assert engine.stats.micro_batches == 1
    for r, c, prompt in zip(requests, got, prompts):
        if not r.choices:
            assert c.num_generated_tokens <= 6 and c.finish_reason in ("stop", "length")
        elif do_sample:
            assert c.text in texts and c.finish_reason == "stop"
        else:
            assert (c.text, c.num_generated_tokens, c.finish_reason) == (*choice_oracle(model_path, prompt, texts),
                                                                        "stop"), r.key
    if do_sample:  # at a high temperature, the rows do not all agree
        assert len({c.text for c in got if requests[c.key].choices}) > 1


INSTRUCTIONS = "You are a careful reader. Read the text below and answer in a few words, plainly. " * 2


def templated(engine, n: int, seed: int) -> list[list[int]]:
    """Prompts of one template, whose instructions all of them begin with; the last is them alone."""
    texts = [f"{INSTRUCTIONS}Text: {t}" for t in varied_prompts(n - 1, seed=seed, max_words=30)] + [INSTRUCTIONS]
    return [engine.tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_a_prefix_all_prompts_share_is_computed_once_and_changes_nothing(model_path, kv_cache):
    """batching.share_prefix: prompts of one template get their common beginning computed once per
    micro-batch, into either kind of cache; greedy, each row's completion is still model.generate's on
    its prompt alone."""
    engine = make_engine(model_path, kv_cache)
    requests = [Request(i, ids, 1 + (5 * i) % 12) for i, ids in enumerate(templated(engine, 12, seed=3))]
    got = {c.key: c for c in engine.generate(requests)}
    assert engine.stats.shared_prefix_tokens >= 16 * (len(requests) - engine.stats.micro_batches)
    for r in requests:
        expected = engine.texts.finish(r, 0, alone(engine, r))
        assert (got[r.key].text, got[r.key].num_generated_tokens) == (expected.text, expected.num_generated_tokens)


@pytest.mark.parametrize("kind, kv_cache", [("penalties", "dynamic"), ("sampled", "dynamic"), ("choices", "dynamic"),
                                           ("pattern", "dynamic"), ("sampled", "static"), ("pattern", "static")])
def test_a_shared_prefix_changes_no_setting_of_a_row(model_path, kind, kv_cache):
    """Every processor reads a row's generated tokens and padding right when the prefix is shared: the
    same completions as without sharing (each checked against its own oracle elsewhere)."""
    from lmbatch.config import GenerationOptions
    from lmbatch.decoding.structured import pattern

    params = {"penalties": SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3,
                                          stop=("e",), logprobs=True),
              "sampled": SamplingParams(do_sample=True, temperature=2.0, num_return_sequences=2, logprobs=True)
              }.get(kind, SamplingParams(logprobs=True))
    results = []
    for share in (True, False):
        engine = make_engine(model_path, kv_cache, share_prefix=share, min_padding_efficiency=0,
                             min_decode_efficiency=0)
        held = dict(choices=labels(engine, "yes", "no", "yes please")) if kind == "choices" else dict(
            pattern=pattern(GenerationOptions(regex="(yes|no), [a-z]{1,6}"))) if kind == "pattern" else {}
        requests = [Request(i, ids, 8, params, seed=i, **held) for i, ids in enumerate(templated(engine, 6, seed=4))]
        results.append(sorted((c.key, c.sample_index, c.text, c.num_generated_tokens, c.finish_reason,
                               round(c.logprob, 3)) for c in engine.generate(requests)))
        assert (engine.stats.shared_prefix_tokens > 0) == share
    assert results[0] == results[1]


def test_the_repetition_penalty_is_transformers_and_skips_padding():
    """RepetitionPenalty scores as transformers' processor does, but a token seen only in a row's left
    padding (often the EOS) is not penalized."""
    from transformers import RepetitionPenaltyLogitsProcessor

    scores = torch.randn(2, 10)
    input_ids = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])  # row 0: two tokens of padding (id 0)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = RepetitionPenalty(1.3, mask[:, :4])(input_ids, scores.clone())  # the prompt, then one new token
    expected = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, scores.clone())
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0, 1:], expected[0, 1:])
    assert got[0, 0] == scores[0, 0] != expected[0, 0]  # id 0 only in row 0's padding


class PenaltiesOneByOne(LogitsProcessor):
    """The oracle of OpenAI's presence and frequency penalties: the formula, token by token."""

    def __init__(self, presence, frequency, prompt_length):
        self.presence, self.frequency, self.start = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for i, row in enumerate(input_ids[:, self.start:].tolist()):
            for token, count in collections.Counter(row).items():
                scores[i, token] -= self.frequency * count + self.presence
        return scores


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (-0.5, 1.0)])
def test_presence_and_frequency_penalties_count_each_rows_own_tokens_as_alone(model_path, presence, frequency):
    """Batched, each row is penalized for the tokens it generated itself (not its prompt's, nor its
    neighbours'), as model.generate on its prompt alone with the formula applied token by token."""
    engine = make_engine(model_path, max_batch_tokens=4096)
    penalized = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 6 + (5 * i) % 12, penalized)
                for i, p in enumerate(varied_prompts(12, seed=6, max_words=30))]
    got = {c.key: c for c in engine.generate(requests)}
    assert engine.stats.micro_batches < len(requests)
    changed = 0
    for r in requests:
        penalties = LogitsProcessorList([PenaltiesOneByOne(presence, frequency, len(r.prompt_ids))])
        out = engine.model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=r.max_new_tokens, do_sample=False,
                                    pad_token_id=engine.pad_id, logits_processor=penalties)
        expected = engine.texts.finish(r, 0, out[0, len(r.prompt_ids):].tolist())
        assert (got[r.key].text, got[r.key].num_generated_tokens) == (expected.text, expected.num_generated_tokens)
        changed += expected.text != engine.texts.finish(r, 0, alone(engine, r)).text
    assert changed >= 3  # the penalties shape the texts


def logprob_alone(engine, request, **settings):
    """The oracle: model.generate on the prompt alone, its raw logits (before any processor) turned into
    the log-probability of each token, summed over the tokens the completion counts less an ending EOS."""
    out = engine.model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                                do_sample=False, pad_token_id=engine.pad_id, eos_token_id=sorted(engine.eos_ids),
                                output_logits=True, return_dict_in_generate=True, **settings)
    tokens = out.sequences[0, len(request.prompt_ids):].tolist()
    c = engine.texts.finish(request, 0, tokens)
    counted = c.num_generated_tokens - (tokens[c.num_generated_tokens - 1] in engine.eos_ids)
    return c, sum(torch.log_softmax(out.logits[t][0], -1)[tokens[t]].item() for t in range(counted))


@pytest.mark.parametrize("repetition_penalty, presence", [(1.0, 0.0), (1.3, 0.0), (1.0, 1.5)])
def test_logprobs_are_the_models_own_for_each_row_as_alone(model_path, repetition_penalty, presence):
    """generation.logprobs, batched: each row's text and logprob are those of model.generate on its
    prompt alone, the logprob from the raw logits (a penalty shapes the text, not the probability),
    summed over the counted tokens less an EOS; rows that end early and rows cut by a stop string too."""
    engine = make_engine(model_path, max_batch_tokens=4096)
    stop = ("e",)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 2 + (5 * i) % 14,
                        SamplingParams(repetition_penalty=repetition_penalty, presence_penalty=presence,
                                       stop=stop if i % 3 == 0 else (), logprobs=True))
                for i, p in enumerate(varied_prompts(18, seed=4, max_words=60))]
    got = {c.key: c for c in engine.generate(requests)}
    assert engine.stats.micro_batches < len(requests)
    for r in requests:
        penalties = LogitsProcessorList([PenaltiesOneByOne(presence, 0.0, len(r.prompt_ids))])
        expected, logprob = logprob_alone(engine, r, repetition_penalty=repetition_penalty, logits_processor=penalties)
        c = got[r.key]
        assert (c.text, c.num_generated_tokens, c.finish_reason) == (
            expected.text, expected.num_generated_tokens, expected.finish_reason), r.key
        assert c.logprob == pytest.approx(logprob, rel=1e-4, abs=1e-4) and c.logprob < 0, r.key
    assert {"stop", "length"} <= {c.finish_reason for c in got.values()}


def test_top_logprobs_are_each_steps_likeliest_tokens_as_alone(model_path):
    """generation.top_logprobs, batched, sampled or not: each counted token's id, text and log-probability, and
    the likeliest tokens at its step with theirs, are those of the model's raw logits on the prompt alone
    (through the row's own tokens); the tokens' logprobs add up to the row's logprob."""
    engine = make_engine(model_path, max_batch_tokens=4096)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 2 + (5 * i) % 14,
                        SamplingParams(do_sample=i % 2 == 1, temperature=1.5, stop=("e",) if i % 3 == 0 else (),
                                       logprobs=True, top_logprobs=3), seed=i)
                for i, p in enumerate(varied_prompts(12, seed=5, max_words=60))]
    got = {c.key: c for c in engine.generate(requests)}
    for r in requests:
        c = got[r.key]
        entries = c.token_logprobs.to_pylist()
        tokens = [t["token_id"] for t in entries]
        with torch.no_grad():
            logits = engine.model(torch.tensor([r.prompt_ids + tokens])).logits[0, len(r.prompt_ids) - 1:-1]
        # the counted tokens: the text's, less an EOS that ended the row
        assert tokens and engine.texts.finish(r, 0, tokens).text == c.text
        assert c.num_generated_tokens - 1 <= len(tokens) <= c.num_generated_tokens
        for t, logprobs in zip(entries, torch.log_softmax(logits, -1)):
            assert t["token"] == engine.tokenizer.decode([t["token_id"]])
            assert t["logprob"] == pytest.approx(logprobs[t["token_id"]].item(), abs=1e-4)
            top = logprobs.topk(3)
            assert [u["logprob"] for u in t["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
            for u in t["top_logprobs"]:  # ids as listed (two tokens that tie may come in either order)
                assert u["logprob"] == pytest.approx(logprobs[u["token_id"]].item(), abs=1e-4)
                assert u["token"] == engine.tokenizer.decode([u["token_id"]])
        assert sum(t["logprob"] for t in entries) == pytest.approx(c.logprob, abs=1e-4)
    assert {"stop", "length"} <= {c.finish_reason for c in got.values()}


def choice_logprob_alone(model, prompt_ids, choice_ids) -> float:
    """The oracle of a choice's log-probability: one forward pass over the prompt and the choice alone."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + list(choice_ids)])).logits[0].log_softmax(-1)
    return sum(logits[len(prompt_ids) - 1 + t, token].item() for t, token in enumerate(choice_ids))


def labels(engine, *texts):
    """Choices as a Request holds them: (text, its token ids)."""
    return tuple((t, tuple(engine.tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts)


def assert_choices_scored_as_alone(engine, requests, completions):
    """Each row with choices has every choice's log-probability as the oracle gives it, and its answer's
    as its logprob; a row without has none."""
    for c in completions:
        r = requests[c.key]
        if not r.choices:
            assert c.choice_logprobs is None and c.logprob < 0
            continue
        expected = [choice_logprob_alone(engine.model, r.prompt_ids, ids) for _, ids in r.choices]
        assert c.choice_logprobs == pytest.approx(expected, rel=1e-4, abs=1e-4), r.key
        assert c.logprob == pytest.approx(expected[[t for t, _ in r.choices].index(c.text)], rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("scoring_logits", [scoring.SCORING_LOGITS, 1])  # 1: rows scored one at a time
def test_choices_get_the_models_log_probability_each(model_path, scoring_logits, monkeypatch):
    """With choices and logprobs, greedy or sampled, beside free rows: logprob is log P(answer | prompt),
    the EOS after it left out, and choice_logprobs holds every choice's, in the row's order (rows with
    choices of their own too), each as one forward pass over the prompt and that choice alone gives it."""
    monkeypatch.setattr(scoring, "SCORING_LOGITS", scoring_logits)
    engine = make_engine(model_path, min_padding_efficiency=0, min_decode_efficiency=0)  # one micro-batch
    own = [labels(engine, "positive", "negative", "yes please"), labels(engine, "no", "yes"), ()]
    needed = max(len(ids) for cs in own for _, ids in cs) + 1  # as prepare sets it
    requests = [Request(i, engine.tokenizer(p)["input_ids"], needed, SamplingParams(do_sample=i % 2 == 1,
                                                                                    logprobs=True),
                        seed=i, choices=own[i % 3]) for i, p in enumerate(varied_prompts(8, seed=6, max_words=12))]
    got = engine.generate(requests)
    assert engine.stats.micro_batches == 2  # greedy and sampled rows
    assert_choices_scored_as_alone(engine, requests, got)


@pytest.mark.parametrize("scoring_logits, max_new", [(scoring.SCORING_LOGITS, 3), (1, 3),  # 1: a row at a time
                                                     (scoring.SCORING_LOGITS, 0)])  # 0: scored, not generated
def test_prompt_logprobs_are_the_models_for_each_prompt_alone(model_path, scoring_logits, max_new, monkeypatch):
    """generation.prompt_logprobs: each row's prompt_logprob is the sum of log P(token | the tokens before it)
    over its prompt after the first token, as one forward pass over the prompt alone gives it, whatever
    the left padding of its micro-batch (prompts of 1 to hundreds of tokens; two samples a row). With
    max_new_tokens 0 nothing is generated (and with logprobs, the empty text's logprob is 0, of no tokens)."""
    monkeypatch.setattr(scoring, "SCORING_LOGITS", scoring_logits)
    engine = make_engine(model_path, max_batch_tokens=8192)
    params = SamplingParams(do_sample=True, num_return_sequences=2, prompt_logprobs=True, logprobs=True, top_logprobs=2)
    prompts = [engine.tokenizer(p)["input_ids"] for p in varied_prompts(15, seed=2)] + [[5]]  # and one token alone
    requests = [Request(i, ids, max_new, params, seed=i) for i, ids in enumerate(prompts)]
    got = engine.generate(requests)
    assert len(got) == 32 and engine.stats.micro_batches > 1
    if not max_new:
        assert {(c.text, c.num_generated_tokens, c.finish_reason, c.logprob) for c in got} == {("", 0, "length", 0.0)}
        assert engine.stats.decode_steps == engine.stats.generated_tokens == 0
        assert {len(c.token_logprobs) for c in got} == {0}
    assert [c.prompt_logprob for c in got if c.key == 15] == [0.0, 0.0]  # nothing before it to score it by
    for c in got:
        ids = requests[c.key].prompt_ids
        with torch.inference_mode():
            each = engine.model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        expected = sum(each[j, t].item() for j, t in enumerate(ids[1:]))
        assert c.prompt_logprob == pytest.approx(expected, rel=1e-4, abs=1e-4), c.key


def embedding_alone(base, ids, pooling: Pooling) -> torch.Tensor:
    """The oracle: transformers' model without its LM head (AutoModel) on this prompt alone, pooled."""
    with torch.inference_mode():
        hidden = base(torch.tensor([ids])).last_hidden_state[0]
    vector = (hidden[-1] if pooling.kind == "last" else hidden.mean(0))[:pooling.dimensions]
    return vector / vector.norm() if pooling.normalize else vector


@pytest.mark.parametrize("pooling, max_new", [(Pooling("last"), 3), (Pooling("mean", 16, normalize=False), 0)])
def test_embeddings_are_the_models_for_each_prompt_alone(model_path, pooling, max_new):
    """generation.embedding: each row's embedding is what transformers' AutoModel (the model without its LM
    head, loaded on its own) gives its prompt alone, pooled, cut to its dimensions and normalized, whatever
    the left padding of its micro-batch (prompts of 1 to hundreds of tokens); both samples of a row carry
    it; with max_new_tokens 0 nothing is generated (and no shared start is computed apart)."""
    from transformers import AutoModel

    engine = make_engine(model_path, max_batch_tokens=4096)
    params = SamplingParams(do_sample=True, num_return_sequences=2, embedding=pooling)
    prompts = [list(range(3, 23)) + engine.tokenizer(p)["input_ids"] for p in varied_prompts(15, seed=3)] + [[5]]
    requests = [Request(i, ids, max_new, params, seed=i) for i, ids in enumerate(prompts)]
    got = engine.generate(requests)
    assert len(got) == 32 and engine.stats.micro_batches > 1
    assert (engine.stats.decode_steps > 0) == (engine.stats.shared_prefix_tokens > 0) == (max_new > 0)
    base = AutoModel.from_pretrained(model_path)
    for c in got:
        expected = embedding_alone(base, requests[c.key].prompt_ids, pooling)
        assert c.embedding.type == pa.float32() and len(c.embedding) == (pooling.dimensions or 64)
        assert torch.allclose(torch.tensor(c.embedding.to_numpy()), expected, rtol=1e-4, atol=1e-5), c.key


def test_an_embedding_model_saved_without_its_lm_head_embeds(tiny_llama, tmp_path):
    """Embedding models are often saved as the model alone (Qwen3Model, not Qwen3ForCausalLM): the engine
    loads such a checkpoint (its LM head left as transformers initializes it) and embeds as from the whole."""
    params = SamplingParams(embedding=Pooling("last"))
    requests = [Request(i, [3 + i, 9, 4 * i + 1], 0, params) for i in range(4)]
    whole, alone_ = (make_engine(path).generate(requests) for path in (tiny_llama, save_headless(tiny_llama, tmp_path)))
    assert [c.embedding.to_pylist() for c in whole] == [c.embedding.to_pylist() for c in alone_]


@pytest.mark.parametrize("encoder", ["tiny_bert", "tiny_roberta"])
def test_an_encoder_embeds_each_prompt_as_sentence_transformers_does(encoder, request):
    """An encoder (BERT, RoBERTa: it reads both ways) embeds each prompt as sentence-transformers' encode()
    does it alone, with cls and mean pooling, though the job's micro-batches pad it on the left (fixed
    batches in input order: prompts of 1 to 100 words side by side); a row asking it to generate is an
    error row, and the others are embedded all the same. A separator typed into a text is read as the
    token, and BERT's text stays of token type 0 after it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    path = request.getfixturevalue(encoder)
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    texts = varied_prompts(24, seed=4, max_words=100)
    texts[5] = f"a {engine.tokenizer.sep_token} typed into a text stays in it"
    for mode in ("cls", "mean"):
        params = SamplingParams(embedding=Pooling(mode))
        requests = [Request(i, engine.tokenizer(t)["input_ids"], 0, params) for i, t in enumerate(texts)]
        got = {c.key: c for c in engine.generate(requests + [Request(99, requests[0].prompt_ids, 3, params)])}
        assert got.pop(99).error.startswith("invalid parameter: max_new_tokens must be 0: the model (")
        assert {(c.text, c.finish_reason, c.error) for c in got.values()} == {("", "length", None)}
        st = SentenceTransformer(modules=[Transformer(path), STPooling(64, pooling_mode=mode), Normalize()],
                                 device="cpu")
        expected = st.encode(texts, convert_to_tensor=True)
        vectors = torch.stack([torch.tensor(got[i].embedding.to_numpy()) for i in range(len(texts))])
        assert torch.allclose(vectors, expected, rtol=1e-4, atol=1e-5), mode


@pytest.mark.parametrize("base, labels, problem_type", [
    ("tiny_bert", ["negative", "neutral", "positive"], None),  # softmax over the labels
    ("tiny_bert", ["quality"], "regression"),  # the raw score (FineWeb-Edu's classifier is one)
    ("tiny_llama", ["rejected", "chosen"], "multi_label_classification"),  # a decoder's head; a sigmoid each
])
def test_a_classifier_labels_each_prompt_as_the_transformers_pipeline_does(base, labels, problem_type, request,
                                                                           tmp_path):
    """generation.classify: each row's label and label scores are what transformers' text-classification
    pipeline gives its prompt alone (top_k=None: every label's score), for an encoder's head and a
    decoder's, single-label, regression and multi-label, though the job's micro-batches pad it (fixed batches
    in input order); a row asking a classifier to generate is an error row."""
    from transformers import pipeline

    path = save_classifier(request.getfixturevalue(base), tmp_path, labels, problem_type)
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    texts = varied_prompts(20, seed=6, max_words=100)
    params = SamplingParams(classify=True)
    requests = [Request(i, engine.tokenizer(t)["input_ids"], 0, params) for i, t in enumerate(texts)]
    got = {c.key: c for c in engine.generate(requests + [Request(99, requests[0].prompt_ids, 2, params)])}
    name = type(engine.model).__name__
    assert got.pop(99).error == f"invalid parameter: max_new_tokens must be 0: the model ({name}) is a classifier, " \
                                "and cannot generate"
    classifier = pipeline("text-classification", model=path, top_k=None, device="cpu")
    for i, text in enumerate(texts):
        expected = {d["label"]: d["score"] for d in classifier([text])[0]}
        assert got[i].label == max(expected, key=expected.get), i
        assert got[i].label_scores.to_pylist() == pytest.approx([expected[name] for name in labels], rel=1e-4,
                                                                abs=1e-5), i


def test_a_cross_encoder_scores_each_pair_as_sentence_transformers_does(tiny_bert, tmp_path):
    """input.pair_column: a cross-encoder (a BERT head of one output: a reranker's relevance) reads each query and
    passage joined as its tokenizer joins a pair, the passage of token type 1, and scores it as sentence-transformers'
    CrossEncoder.predict does the pair alone, though the job's micro-batches pad it (fixed batches in input order).
    A [SEP] typed into a query is read as the token, and the query's type stays 0 after it, as the tokenizer gives."""
    from sentence_transformers import CrossEncoder

    from lmbatch.prepare.tokens import encode_pairs

    path = save_classifier(tiny_bert, tmp_path, ["relevance"])
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    assert engine.encoder.token_types
    queries, passages = varied_prompts(20, seed=8, max_words=12), varied_prompts(20, seed=9, max_words=100)
    queries[1::3] = [q.replace(" ", " [SEP] ", 1) for q in queries[1::3]]
    pairs = list(zip(queries, passages))
    params = SamplingParams(classify=True)
    requests = [Request(i, ids, 0, params, second_text_start=start)
                for i, (ids, start) in enumerate(encode_pairs(engine.tokenizer, pairs, frozenset()))]
    alone = engine.tokenizer(*pairs[1])
    assert requests[1].prompt_ids == alone["input_ids"] and alone["input_ids"].count(engine.tokenizer.sep_token_id) == 3
    assert alone["token_type_ids"].index(1) == requests[1].second_text_start
    scores = [c.label_scores.to_pylist()[0] for c in engine.generate(requests)]
    expected = CrossEncoder(path, device="cpu").predict(pairs)
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)


def test_a_lora_adapter_is_merged_and_generates_as_transformers_applies_it(tiny_llama, lora_adapter):
    """model.adapter, merged into the weights as the engine loads: batched greedy output equals that of
    the base model with the adapter loaded by transformers (unmerged: the adapter runs beside each
    layer) on each prompt alone, and differs from the base model's."""
    from transformers import AutoModelForCausalLM

    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama, dtype="float32", adapter=lora_adapter),
                           BatchingConfig(), device="cpu")
    assert not any("lora" in name for name, _ in engine.model.named_modules())  # merged: no adapter layers left
    adapted = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapted.load_adapter(lora_adapter)
    base = make_engine(tiny_llama)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 8) for i, p in enumerate(varied_prompts(12, seed=7,
                                                                                                     max_words=40))]
    got = {c.key: c.text for c in engine.generate(requests)}
    for r in requests:
        alone = adapted.generate(torch.tensor([r.prompt_ids]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=engine.pad_id)
        assert got[r.key] == engine.texts.finish(r, 0, alone[0, len(r.prompt_ids):].tolist()).text, r.key
    assert got != {c.key: c.text for c in base.generate(requests)}


def test_rows_of_several_adapters_each_generate_as_transformers_applies_theirs(tiny_llama, lora_adapter, tmp_path):
    """model.adapters, unmerged beside the weights: rows picking either adapter (SamplingParams.adapter, from
    generation.adapter or a row's column) or none, mixed in one call, each generate greedily as the base
    model with that adapter loaded by transformers (or without one) on its prompt alone."""
    from transformers import AutoModelForCausalLM

    from conftest import save_lora_adapter

    paths = {"first": lora_adapter, "second": str(save_lora_adapter(tiny_llama, tmp_path / "second", seed=1))}
    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama, dtype="float32", adapters=paths), BatchingConfig(),
                           device="cpu")
    names = [None, "first", "second"]
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 6, SamplingParams(adapter=names[i % 3]))
                for i, p in enumerate(varied_prompts(12, seed=7, max_words=40))]
    got = {c.key: c.text for c in engine.generate(requests)}
    for name in names:
        model = AutoModelForCausalLM.from_pretrained(tiny_llama)
        if name:
            model.load_adapter(paths[name])
        for r in requests:
            if r.params.adapter == name:
                alone = model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=6, do_sample=False,
                                       pad_token_id=engine.pad_id)
                assert got[r.key] == engine.texts.finish(r, 0, alone[0, len(r.prompt_ids):].tolist()).text, (name, r.key)
    same_prompt = [Request(i, requests[0].prompt_ids, 6, SamplingParams(adapter=name)) for i, name in enumerate(names)]
    assert len({c.text for c in engine.generate(same_prompt)}) == 3  # each adapter changes the text


@pytest.mark.parametrize("do_sample", [False, True])
def test_choices_of_one_token_are_scored_at_the_first_step(model_path, do_sample, monkeypatch):
    """Labels of one token each are scored from the scores generate computes at its first step, with
    no forward pass of their own (rows with fewer choices, and free rows, beside them), and their
    log-probabilities are those one forward pass over the prompt and the label gives."""
    engine = make_engine(model_path, min_padding_efficiency=0, min_decode_efficiency=0)  # one micro-batch
    own = [labels(engine, "a", " the", "it"), labels(engine, "e", " a"), ()]
    assert all(len(ids) == 1 for cs in own for _, ids in cs)
    params = SamplingParams(do_sample=do_sample, temperature=3.0, num_return_sequences=2 if do_sample else 1,
                            logprobs=True)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 2, params, seed=i, choices=own[i % 3])
                for i, p in enumerate(varied_prompts(9, seed=9, max_words=20))]
    monkeypatch.setattr(engine_module, "score_choices", None)  # fails if called
    got = engine.generate(requests)
    assert engine.stats.micro_batches == 1 and len(got) == 9 * params.num_return_sequences
    assert_choices_scored_as_alone(engine, requests, got)


def test_a_row_ends_at_the_tokenizers_eos_too(tiny_llama, tmp_path):
    """A generation config that leaves out the tokenizer's EOS (the token a chat model ends its turn
    with, say) made model.generate run on past every answer: the engine stops at both."""
    path = tmp_path / "model"
    shutil.copytree(tiny_llama, path)
    settings = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": [3, 4]}))
    engine = make_engine(str(path))
    tokenizer_eos = engine.tokenizer.eos_token_id
    assert tokenizer_eos not in (3, 4) and engine.eos_ids == {3, 4, tokenizer_eos}
    r = Request(0, engine.tokenizer("hello")["input_ids"], 5)
    for eos in (3, 4, tokenizer_eos):
        assert engine.texts.finish(r, 0, [11, 12, eos, 13]) == Completion(0, 0, engine.texts.decode([11, 12]), 3, "stop")


def test_a_stop_string_that_spells_a_special_token_ends_the_row_at_that_token(tiny_llama):
    """Texts never show special tokens (decoding skips them), so a stop string that spells one (a chat
    fine-tune's "<|im_end|>" whose generation config names only the base model's EOS) is looked for as
    the token: the row ends where the model generates it, as at an EOS, and its logprob leaves it out."""
    engine = make_engine(tiny_llama)
    prompt = engine.tokenizer("the weather today")["input_ids"]
    user = engine.tokenizer.convert_tokens_to_ids("<|user|>")
    before = alone(engine, Request(0, prompt, 8))
    with torch.no_grad():  # a model that writes <|user|> where it wrote its third token
        logits = engine.model(torch.tensor([prompt + before[:2]])).logits[0, -1]
        head = engine.model.get_output_embeddings().weight
        head[user] = head[before[2]] * (1.5 if logits[before[2]] > 0 else 0.5)
    tokens = alone(engine, Request(0, prompt, 8))
    at = tokens.index(user)
    params = SamplingParams(stop=("<|user|>", "zzz"), logprobs=True)
    stopped, free = engine.generate([Request(0, prompt, 8, params), Request(1, prompt, 8)])
    assert (stopped.text, stopped.num_generated_tokens, stopped.finish_reason) == (engine.texts.decode(tokens[:at]), at + 1,
                                                                                    "stop")
    _, logprob = logprob_alone(engine, Request(0, prompt, at))
    assert stopped.logprob == pytest.approx(logprob, abs=1e-4)
    assert free.num_generated_tokens > at + 1  # without it the row goes on past the token, which its text leaves out


def test_eos_ends_a_row_with_stop(tiny_llama):
    engine = make_engine(tiny_llama)
    eos = next(iter(engine.eos_ids))
    r = Request(0, engine.tokenizer("hello")["input_ids"], 5)
    assert engine.texts.finish(r, 0, [11, 12, eos, engine.pad_id]) == Completion(0, 0, engine.texts.decode([11, 12]), 3, "stop")


def test_sampling_is_seeded_and_returns_n_samples(tiny_llama):
    engine = make_engine(tiny_llama, max_batch_rows=6)
    params = SamplingParams(do_sample=True, temperature=0.9, num_return_sequences=3)
    reqs = [Request(i, engine.tokenizer(p)["input_ids"], 12, params, seed=100 + i) for i, p in enumerate(varied_prompts(6))]
    assert max(len(b) for b in engine.plan(reqs)) == 2  # 3 samples a row: 6 sequences
    first, second = engine.generate(reqs), engine.generate(reqs)
    assert [(c.key, c.sample_index, c.text) for c in first] == [(c.key, c.sample_index, c.text) for c in second]
    assert sorted((c.key, c.sample_index) for c in first) == [(i, s) for i in range(6) for s in range(3)]
    assert len({c.text for c in first if c.key == 0}) > 1  # samples of one prompt differ
    # Each row draws from its own seeded stream: the same samples alone as in a batch.
    for r in reqs[:3]:
        alone_ = [(c.sample_index, c.text) for c in engine.generate([r])]
        assert alone_ == [(c.sample_index, c.text) for c in first if c.key == r.key]


def warped(scores, temperature, top_k, top_p, min_p):
    """The probabilities generate(do_sample=True) samples from: transformers' own warpers."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = TemperatureLogitsWarper(temperature)(None, scores)
    scores = TopKLogitsWarper(top_k)(None, scores) if top_k else scores
    scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1 else scores
    scores = MinPLogitsWarper(min_p)(None, scores) if min_p else scores
    return torch.softmax(scores, -1)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (0.7, 50, 0.9, 0.0), (1.3, 0, 0.8, 0.0), (0.5, 3, 0.95, 0.0),
    (1.0, 0, 1.0, 0.1), (1.5, 50, 0.9, 0.2)])
def test_the_sampler_draws_from_the_distribution_transformers_warpers_leave(temperature, top_k, top_p, min_p):
    """The sampler's candidates and probabilities are those of transformers' warpers, and its
    draws, one stream per row, follow them."""
    params = SamplingParams(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    scores = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3
    probs, tokens = PerRowSampler(params, [0] * 64, "cpu", 1).distribution(scores)
    dense = torch.zeros_like(scores).scatter_(1, tokens, probs) if tokens is not None else probs
    assert torch.allclose(dense / dense.sum(-1, keepdim=True), warped(scores, temperature, top_k, top_p, min_p),
                          atol=1e-6)

    # 20,000 rows with one distribution, one draw each: the frequencies are its probabilities.
    row = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0]])
    drawn = PerRowSampler(params, list(range(20_000)), "cpu", 1)(None, row.expand(20_000, 5)).argmax(-1)
    assert torch.allclose(torch.bincount(drawn, minlength=5) / 20_000,
                          warped(row, temperature, top_k, top_p, min_p)[0], atol=0.012)


def test_a_distribution_that_is_not_one_fails_the_rows_as_multinomial_would():
    sampler = PerRowSampler(SamplingParams(do_sample=True), [1, 2], "cpu", 1)
    with pytest.raises(ValueError, match="probability tensor contains either inf, nan"):
        sampler(None, torch.tensor([[0.0, 1.0], [float("nan"), 1.0]]))


def test_a_models_own_generation_settings_do_not_change_the_output(tiny_llama, tmp_path, capsys):
    """transformers fills what a generate call leaves unset from the model's generation_config.json.
    Settings that real models ship there (Qwen2.5-Instruct: do_sample, temperature, top_k, top_p,
    repetition_penalty) or could (a beam count, a ban on repeated n-grams, a minimum length) must
    neither change the job's greedy output nor pass unremarked."""
    from transformers import GenerationConfig

    from lmbatch.config import GenerationOptions, JobConfig
    from lmbatch.plan.model_checks import check_model

    shipped = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05,
                   num_beams=3, no_repeat_ngram_size=2, min_new_tokens=12)
    path = str(tmp_path / "model")
    shutil.copytree(tiny_llama, path)
    config = GenerationConfig.from_pretrained(path)
    config.update(**shipped)
    config.save_pretrained(path)

    plain, shaped = make_engine(tiny_llama), make_engine(path)
    requests = [Request(i, plain.tokenizer(p)["input_ids"], 12) for i, p in enumerate(varied_prompts(12, seed=3))]
    expected = [(c.text, c.finish_reason) for c in plain.generate(requests)]
    assert {reason for _, reason in expected} == {"stop", "length"}  # min_new_tokens would change the former
    assert [(c.text, c.finish_reason) for c in shaped.generate(requests)] == expected
    assert shaped.eos_ids == plain.eos_ids

    check_model(JobConfig(model=ModelConfig(path=path)))
    note = capsys.readouterr().out
    assert note.startswith(f"lmbatch: note: the generation_config.json of {path} sets ")
    assert all(f"{k}={v}" in note for k, v in shipped.items()) and "does not apply" in note
    check_model(JobConfig(model=ModelConfig(path=tiny_llama)))
    assert capsys.readouterr().out == ""  # the usual token ids and flags are not worth a note
    # a job that samples as the model suggests applies those settings, as its own
    suggested = GenerationOptions(**{k: shipped[k] for k in ("do_sample", "temperature", "top_k", "top_p",
                                                             "repetition_penalty")})
    check_model(JobConfig(model=ModelConfig(path=path), generation=suggested))
    assert capsys.readouterr().out.split(" sets ")[1].split(", which")[0] == \
        "min_new_tokens=12, num_beams=3, no_repeat_ngram_size=2"


def test_kv_cache_per_token_is_read_from_the_models_config():
    """What the dry run multiplies its largest micro-batch by, for the shapes conf/batching/gpu.yaml cites."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    from lmbatch.models import kv_cache_bytes_per_token

    qwen_0_5b = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2)
    llama_8b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    assert kv_cache_bytes_per_token(qwen_0_5b, "bfloat16") == 12 * 1024
    assert kv_cache_bytes_per_token(llama_8b, "bfloat16") == 128 * 1024
    assert kv_cache_bytes_per_token(GPT2Config(n_layer=12, n_head=12, n_embd=768), "float32") == 12 * 2 * 768 * 4


def test_device_map_auto_loads_through_accelerate(tiny_llama):
    """model.device_map=auto (how a replica spans its GPUs) loads and generates the same text; here on the CPU."""
    plain = make_engine(tiny_llama)
    mapped = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama, dtype="float32", device_map="auto"),
                           BatchingConfig(), device="cpu")
    assert str(mapped.model.device) == "cpu"  # (without accelerate installed, device_map raises)
    requests = [Request(i, plain.tokenizer(p)["input_ids"], 6) for i, p in enumerate(varied_prompts(5, max_words=20))]
    assert [c.text for c in mapped.generate(requests)] == [c.text for c in plain.generate(requests)]


@pytest.mark.parametrize("requested, device, dtype, flash, expected", [
    (None, "cpu", "float32", True, None),                       # CPU: transformers' choice (SDPA)
    (None, "cuda", "bfloat16", False, None),                    # no flash_attn, or a model without it: SDPA
    (None, "cuda", "bfloat16", True, "flash_attention_2"),
    (None, "cuda:0", "float16", True, "flash_attention_2"),
    (None, "cuda", "float32", True, None),                      # FlashAttention needs 16-bit
    ("eager", "cuda", "bfloat16", True, "eager"),               # the config always wins
])
def test_attention_kernel_choice(requested, device, dtype, flash, expected):
    assert choose_attention(requested, device, dtype, flash_usable=flash) == expected


def test_flash_attention_asked_only_of_a_model_that_has_it():
    """transformers refuses to load a model with attn_implementation=flash_attention_2 unless it is written for
    it: with flash_attn installed on a GPU, an MPNet embedder (all-mpnet-base-v2's) would not load at all."""
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig, MPNetConfig

    assert has_flash_attention(AutoModelForCausalLM, LlamaConfig())
    assert has_flash_attention(AutoModel, BertConfig())
    assert not has_flash_attention(AutoModel, MPNetConfig())


@pytest.mark.parametrize("requested, device, expected", [
    (None, "cpu", "dynamic"), (None, "cuda", "static"), (None, "cuda:1", "static"),
    ("dynamic", "cuda", "dynamic"), ("static", "cpu", "static"),  # the config always wins
])
def test_kv_cache_choice(requested, device, expected):
    assert choose_kv_cache(requested, device) == expected
