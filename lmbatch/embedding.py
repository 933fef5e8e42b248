"""Prompt embeddings (generation.embedding): a forward pass of the model without its LM head over the
left-padded prompts of a micro-batch, the last hidden states pooled per row."""

from __future__ import annotations

import pyarrow as pa
import torch

from lmbatch.interface import Pooling, Request
from lmbatch.scoring import left_padded_positions


def embed_prompts(model, batch: list[Request], input_ids, attention_mask, pooling: Pooling) -> dict[int, pa.Array]:
    """Each prompt's embedding (by request key), as the model gives it for the prompt alone: the hidden
    states of its last layer (after the final norm), pooled. Padding is on the left, so a row's last
    position is its last token, and positions count from its first real token, as alone."""
    device = model.device
    mask = attention_mask.to(device)
    with torch.inference_mode():
        # base_model: the model without its LM head (LlamaModel in LlamaForCausalLM), which ends in the norm
        hidden = model.base_model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False,
                                  position_ids=left_padded_positions(mask)).last_hidden_state
        if pooling.kind == "last":
            vectors = hidden[:, -1].float()
        else:  # a masked sum as one matmul, not a float32 copy of every hidden state
            vectors = (mask[:, None, :].to(hidden.dtype) @ hidden).squeeze(1).float() / mask.sum(-1, keepdim=True)
        vectors = vectors[:, :pooling.dimensions]
        if pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return {r.key: pa.array(v) for r, v in zip(batch, vectors.cpu().numpy())}
