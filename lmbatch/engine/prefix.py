"""Micro-batches laid out for generate, and the prefix their prompts share computed once
(batching.share_prefix; `requests.shared_prefix` says how many tokens, and is pure so the dry run
counts them too)."""

from __future__ import annotations

from typing import Sequence

import torch

from lmbatch.engine.scoring import cache_keyword
from lmbatch.engine.types import Request


def layout(batch: Sequence[Request], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of the micro-batch, every prompt ending where generation starts:
    left-padded, or, with `shared` tokens that all prompts begin with, those first (at the positions
    their cache holds them), then padding, then each prompt's own rest."""
    width = shared + max(len(r.prompt_ids) - shared for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        rest = r.prompt_ids[shared:]
        input_ids[i, :shared], attention_mask[i, :shared] = torch.tensor(r.prompt_ids[:shared]), 1
        input_ids[i, width - len(rest):], attention_mask[i, width - len(rest):] = torch.tensor(rest), 1
    return input_ids, attention_mask


def prefix_cache(model, prefix: list[int], sequences: int, kv_cache: str, length: int):
    """The KV cache of a shared prefix, computed once and repeated for every sequence, in the kind of
    cache generate is to use (`kv_cache`; a static one holds `length` tokens); None for a model whose
    cache is more than plain attention's keys and values (sliding windows, recurrent states)."""
    from transformers import DynamicCache, StaticCache

    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer).__name__ != "DynamicLayer" for layer in cache.layers):
        return None
    with torch.inference_mode():
        model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True, **{cache_keyword(model): cache})
    if kv_cache == "dynamic":
        cache.batch_repeat_interleave(sequences)
        return cache
    static = StaticCache(config=model.config, max_cache_len=length)
    for layer, computed in zip(static.layers, cache.layers):  # written once per sequence, into its rows
        layer.update(computed.keys.expand(sequences, -1, -1, -1), computed.values.expand(sequences, -1, -1, -1))
    return static
