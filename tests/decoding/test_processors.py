"""The hf engine's logits processors and stop strings: the penalties, the per-row sampler against
transformers' warpers, stop strings checked on the rows still going.
"""



import pytest
import torch
from transformers import LogitsProcessorList

from helpers.data import varied_prompts
from helpers.engines import PenaltiesOneByOne, alone, make_engine
from lmbatch.decoding.processors import PerRowSampler, RepetitionPenalty
from lmbatch.engine.types import Request, SamplingParams


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
