"""LoRA adapters in the hf engine: one merged, or several held and picked per row, each generating as
transformers applies it.
"""


import torch

from helpers.data import varied_prompts
from helpers.engines import make_engine
from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.engine.hf import HFEngine
from lmbatch.engine.types import Request, SamplingParams


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

    from helpers.models import save_lora_adapter

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
