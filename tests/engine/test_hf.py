"""The hf engine against the correctness oracle: model.generate on each prompt alone.

Runs in-process (no Ray) on both a rotary (Llama) and a learned-position (GPT-2) tiny model,
in float32: batched left-padded greedy output must equal unbatched output token for token.
"""

import json
import shutil

import pytest
import torch

from helpers.data import varied_prompts
from helpers.engines import alone, labels, logprob_alone, make_engine
from helpers.oracles import choice_oracle
from lmbatch.config import ModelConfig
from lmbatch.engine.types import Completion, Request, SamplingParams


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


