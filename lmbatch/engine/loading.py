"""Loading a model for a replica: the auto class for what the checkpoint is (a classifier, an encoder, a
causal LM), its dtype and attention kernel on the device, its adapters (merged, or beside its layers),
and its tokenizer."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from lmbatch.config import ModelConfig
from lmbatch.models import is_classifier, reads_both_ways
from lmbatch.models.files import tokenizer_source


def choose_attention(requested: Optional[str], device: str, dtype: str, flash_usable: bool) -> Optional[str]:
    """The configured attention kernel; unset: FlashAttention-2 on a GPU in 16-bit when it is usable (the
    flash_attn package installed and the model written for it), else None (transformers picks SDPA where
    the model has it)."""
    if requested:
        return requested
    if flash_usable and device.startswith("cuda") and dtype in ("bfloat16", "float16"):
        return "flash_attention_2"
    return None


def has_flash_attention(auto, config) -> bool:
    """Whether the class `auto` loads for `config` is written for FlashAttention-2: asked of one that is
    not (MPNet, many older encoders), transformers refuses to load it. A class of the model's own code
    (trust_remote_code) is not known before it is loaded: it is trusted to say so itself."""
    model_class = auto._model_mapping.get(type(config), None)
    return model_class is None or bool(getattr(model_class, "_supports_flash_attn", False))


def load_model(model_path: str, model: ModelConfig, device: Optional[str] = None):
    """(the model in eval mode, its tokenizer, the peft model holding model.adapters or None), loaded on
    `device` (default: CUDA when there is one) in the configured dtype."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmbatch.models.tokens import load_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    config = AutoConfig.from_pretrained(model_path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    # a classifier with its head, an encoder without one (it has no LM head), anything else with its LM head
    auto = (AutoModelForSequenceClassification if is_classifier(config) else
            AutoModel if reads_both_ways(config) else AutoModelForCausalLM)
    kwargs = dict(config=config, dtype=getattr(torch, dtype), trust_remote_code=model.trust_remote_code)
    flash_usable = importlib.util.find_spec("flash_attn") is not None and has_flash_attention(auto, config)
    attention = choose_attention(model.attn_implementation, device, dtype, flash_usable)
    if attention:
        kwargs["attn_implementation"] = attention
    if model.device_map:
        kwargs["device_map"] = model.device_map
    loaded = auto.from_pretrained(model_path, revision=model.revision, **kwargs)
    adapters = None
    if model.adapter:  # merged: the adapter then costs nothing per token
        from peft import PeftModel

        loaded = PeftModel.from_pretrained(loaded, model.adapter).merge_and_unload()
    elif model.adapters:  # each beside the layers it adapts, switched on for the micro-batches of its rows
        from peft import PeftModel

        (first, path), *others = model.adapters.items()
        adapters = PeftModel.from_pretrained(loaded, path, adapter_name=first)
        for name, path in others:
            adapters.load_adapter(path, adapter_name=name)
    if not model.device_map:
        loaded.to(device)
    tokenizer_path, revision = tokenizer_source(model_path, model.revision, model.adapter)
    tokenizer = load_tokenizer(tokenizer_path, model.trust_remote_code, revision=revision)
    return loaded.eval(), tokenizer, adapters


def choose_kv_cache(requested: Optional[str], device: str) -> str:
    """The configured KV cache; unset: `static` on a GPU, `dynamic` on CPU.

    On a GPU a step of a small model is bound by kernel launches and allocations, and a dynamic
    cache reallocates every layer's keys and values at every step: measured on an H200
    (Qwen2.5-0.5B shape, bf16), 57 vs 18 ms per step at 512 rows, 176 vs 127 ms at 1,024 rows of
    1,024 tokens. On CPU static was no faster (tiny model: 2.2 vs 1.9 ms per step)."""
    if requested:
        return requested
    return "static" if device.startswith("cuda") else "dynamic"
