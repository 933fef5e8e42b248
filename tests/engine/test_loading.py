"""Loading a replica's model: the device map, the attention kernel, the kind of KV cache, and the KV
cache a token takes.
"""


import pytest

from helpers.data import varied_prompts
from helpers.engines import make_engine
from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.engine.hf import HFEngine
from lmbatch.engine.loading import choose_attention, choose_kv_cache, has_flash_attention
from lmbatch.engine.types import Request


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
