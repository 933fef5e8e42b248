"""Scoring in the hf engine: each row's log-probabilities and top alternatives, its choices' and its
prompt's log-probabilities, as the model gives them for the row alone.
"""


import pytest
import torch
from transformers import LogitsProcessorList

from helpers.data import varied_prompts
from helpers.engines import PenaltiesOneByOne, labels, logprob_alone, make_engine
from lmbatch.engine import hf as engine_module
from lmbatch.engine import scoring
from lmbatch.engine.types import Request, SamplingParams


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
