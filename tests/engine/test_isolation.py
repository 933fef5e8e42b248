"""Failures isolated in the hf engine: out of memory halves the micro-batch and later budgets, a row that
breaks generation fails alone, and a lost device or a model failing every row stops the replica.
"""


import shutil

import pytest
import torch
from transformers import AutoTokenizer

from helpers.config import compose
from helpers.data import one_prompt, varied_prompts
from helpers.tally import TALLY
from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.engine.hf import FAILED_ROWS_BEFORE_ANY_SUCCESS, EngineFailed, HFEngine
from lmbatch.engine.types import Request
from lmbatch.plan.job import plan_job, to_job_config


def engine_short_of_memory(model_path, rows, batching):
    """An engine whose model raises torch.OutOfMemoryError for batches above 3 rows; its requests, and
    their texts as generated before the limit was injected."""
    engine = HFEngine.load(model_path, ModelConfig(path=model_path), batching, device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 6) for i, p in enumerate(varied_prompts(rows, max_words=20))]
    expected = {c.key: c.text for c in engine.generate(requests)}
    forward = engine.model.forward

    def forward_with_small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return forward(*args, **kwargs)

    engine.model.forward = forward_with_small_memory
    TALLY["faults"] += 1
    return engine, requests, expected


def test_out_of_memory_halves_the_micro_batch_and_retries(tiny_llama, caplog):
    """Batches above 3 rows run out of memory: halved until they fit, output unchanged."""
    engine, requests, expected = engine_short_of_memory(tiny_llama, 12, BatchingConfig(min_padding_efficiency=0.0))
    assert engine.stats.micro_batches == 1
    with caplog.at_level("WARNING", logger="lmbatch.engine"):
        got = engine.generate(requests)
    assert {c.key: c.text for c in got} == expected and all(c.error is None for c in got)
    assert engine.stats.split_retries == 3  # 12 -> 6 + 6 -> 3 + 3 + 3 + 3
    assert any("out of memory" in r.getMessage() for r in caplog.records)


def test_out_of_memory_shrinks_the_budget_of_later_micro_batches(tiny_llama):
    """A token budget too large for the device costs one failed micro-batch, not one per micro-batch:
    after the first out-of-memory error the rest is planned under half the failed batch's size, and
    so is the next chunk (the budget belongs to the replica)."""
    engine, requests, expected = engine_short_of_memory(
        tiny_llama, 24, BatchingConfig(max_batch_rows=8, min_padding_efficiency=0.0, min_decode_efficiency=0.0))
    assert engine.stats.micro_batches == 3
    splits_after_each_batch = []
    got = engine.generate(requests, lambda done: splits_after_each_batch.append(engine.stats.split_retries))
    assert {c.key: c.text for c in got} == expected and all(c.error is None for c in got)
    first = splits_after_each_batch[0]
    assert first > 0 and set(splits_after_each_batch) == {first}  # only the first micro-batch failed
    assert engine.batching.max_batch_tokens < BatchingConfig().max_batch_tokens
    engine.generate(requests)
    assert engine.stats.split_retries == first  # the next chunk: planned to fit from the start


def test_a_lost_device_stops_the_replica_instead_of_failing_every_row(tiny_llama):
    """After CUDA's sticky errors (an illegal memory access, a device-side assert) every later call
    fails, so isolating rows would write each one, to the end of the job, as an error row. The
    engine asks the device whether it still works, and stops if it does not. (No GPU here: the
    error is raised in the model's forward and the device answers as a CUDA device would then.)"""
    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama), BatchingConfig(), device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 4) for i, p in enumerate(varied_prompts(6, max_words=8))]

    def forward_after_an_illegal_access(*args, **kwargs):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered\nCompile with ...")

    engine.model.forward = forward_after_an_illegal_access
    failed = engine.generate(requests)  # the device still works: the failure is isolated, row by row
    assert {c.error for c in failed} == {"generation failed: AcceleratorError: CUDA error: an illegal memory access "
                                         "was encountered\nCompile with ..."}
    engine._device_lost = lambda: True
    with pytest.raises(EngineFailed, match="the cpu device failed and this process can no longer use it "
                                         r"\(AcceleratorError: CUDA error: an illegal memory access was encountered\); "
                                         "the job stops rather than write every later row as an error row"):
        engine.generate(requests)
    TALLY["faults"] += 1


def test_a_model_that_fails_on_every_row_stops_the_job(tiny_llama, tmp_path, capsys):
    """A broken model fails every row: here a tokenizer that does not match it (tokens added past
    the model's embedding; remote code that no longer fits transformers fails alike). Rather than
    write the whole job as error rows and exit 0, the engine stops once rows have failed alone many
    times and none has succeeded. (This mismatch the driver also warns of as the job starts.)"""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<new{i}>" for i in range(8)])
    tokenizer.save_pretrained(model)
    plan_job(to_job_config(compose(f"input.path={one_prompt(tmp_path)}", f"output.path={tmp_path / 'out'}",
                                   f"model.path={model}")))
    assert (f"lmbatch: warning: the tokenizer of {model} has {len(tokenizer):,} tokens, the model's embedding "
            f"{len(tokenizer) - 8:,}: a row holding one of the last 8 fails (index out of range)"
            in capsys.readouterr().out)
    engine = HFEngine.load(str(model), ModelConfig(path=str(model)), BatchingConfig(), device="cpu")
    requests = [Request(i, engine.tokenizer(f"row {i} <new{i % 8}>")["input_ids"], 4) for i in range(40)]
    with pytest.raises(EngineFailed, match=f"generation failed for each of the first {FAILED_ROWS_BEFORE_ANY_SUCCESS} "
                                           r"rows tried alone and has not succeeded for any \(IndexError: index out "
                                           r"of range in self\): the model or engine is broken, not the rows"):
        engine.generate(requests)
    TALLY["faults"] += 1


def test_a_row_that_breaks_generation_is_isolated(tiny_llama):
    engine = HFEngine.load(tiny_llama, ModelConfig(path=tiny_llama), BatchingConfig(min_padding_efficiency=0.0),
                      device="cpu")
    requests = [Request(i, engine.tokenizer(p)["input_ids"], 5) for i, p in enumerate(varied_prompts(10, max_words=20))]
    poison = 7  # a token id only the bad row carries
    requests[4].prompt_ids = requests[4].prompt_ids + [poison]
    expected = {c.key: c.text for c in engine.generate([r for r in requests if r.key != 4])}
    forward = engine.model.forward

    def forward_failing_on_poison(*args, **kwargs):
        if (kwargs["input_ids"] == poison).any():
            raise ValueError("index out of range in self")
        return forward(*args, **kwargs)

    engine.model.forward = forward_failing_on_poison
    got = {c.key: c for c in engine.generate(requests)}
    TALLY["faults"] += 1
    TALLY["bad_input_kinds"].add("row that breaks generation")
    assert got[4].finish_reason == "error" and got[4].text is None
    assert got[4].error == "generation failed: ValueError: index out of range in self"
    assert {k: c.text for k, c in got.items() if k != 4} == expected
