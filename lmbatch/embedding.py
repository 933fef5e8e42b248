"""Prompt embeddings (generation.embedding): a forward pass of the model without its LM head over the
prompts of a micro-batch, the last hidden states pooled per row."""

from __future__ import annotations

import pyarrow as pa
import torch

from lmbatch.interface import Pooling, Request
from lmbatch.scoring import left_padded_positions


def embed_prompts(model, batch: list[Request], input_ids, attention_mask, pooling: Pooling,
                  bidirectional: bool) -> dict[int, pa.Array]:
    """Each prompt's embedding (by request key), as the model gives it for the prompt alone: the hidden
    states of its last layer (after the final norm), pooled. The prompts come left-padded: a decoder reads
    them so, its positions counted from each row's first real token; an encoder (`bidirectional`) reads
    them right-padded, as its positions count from the first slot (or, in RoBERTa's, from the pad id)."""
    device = model.device
    if bidirectional:
        input_ids, attention_mask = right_padded(input_ids, attention_mask)
    mask = attention_mask.to(device)
    kwargs = {} if bidirectional else dict(use_cache=False, position_ids=left_padded_positions(mask))
    with torch.inference_mode():
        # base_model: the model without its LM head (LlamaModel in LlamaForCausalLM), which ends in the norm
        hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=mask, **kwargs).last_hidden_state
        if pooling.kind == "mean":  # a masked sum as one matmul, not a float32 copy of every hidden state
            vectors = (mask[:, None, :].to(hidden.dtype) @ hidden).squeeze(1).float() / mask.sum(-1, keepdim=True)
        else:  # one token's: the first ([CLS]) or the last, the real tokens being in one run either way
            first = mask.argmax(-1)
            index = first if pooling.kind == "cls" else first + mask.sum(-1) - 1
            vectors = hidden[torch.arange(len(hidden), device=device), index].float()
        vectors = vectors[:, :pooling.dimensions]
        if pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return {r.key: pa.array(v) for r, v in zip(batch, vectors.cpu().numpy())}


def right_padded(input_ids, attention_mask):
    """A left-padded batch with each row's padding moved to its end (the row rotated by its pad count)."""
    width = attention_mask.shape[1]
    index = (torch.arange(width) + (attention_mask == 0).sum(-1, keepdim=True)) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)
