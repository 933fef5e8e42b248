"""Pooling the prompts of a micro-batch, without generating: embeddings (generation.embedding), the last
hidden states of a forward pass without the LM head pooled per row, and sequence classification
(generation.classify), a classifier's label scores for each row as transformers' text-classification
pipeline gives them for the prompt alone. Both share one forward pass, `last_hidden_states`."""

from __future__ import annotations

import dataclasses
from typing import Optional

import pyarrow as pa
import torch

from lmbatch.engine.scoring import left_padded_positions
from lmbatch.engine.types import Pooling, Request
from lmbatch.models.architecture import score_function


@dataclasses.dataclass(frozen=True)
class EncoderReading:
    """How an encoder (a model that reads text both ways) is handed a left-padded micro-batch."""

    token_types: bool = False
    """Whether the model tells a pair's two texts apart by token types (BERT: set where the tokenizer returns
    token_type_ids and the model has more than one type): a cross-encoder reads the second text as type 1.
    False: no token types (RoBERTa's pairs are told apart by separators alone)."""

    @classmethod
    def of(cls, model, tokenizer) -> "EncoderReading":
        return cls("token_type_ids" in tokenizer.model_input_names and getattr(model.config, "type_vocab_size", 1) > 1)

    def inputs(self, batch: list[Request], input_ids, attention_mask, device) -> dict:
        """The model's keyword inputs: the rows right-padded, as they are read alone (positions count from the
        first slot, or in RoBERTa's from the pad id), and token types where the model reads them: 1 from where
        a pair's second text begins (`Request.second_text_start`: its text and its [SEP]), 0 before it and in
        a single text, as the tokenizer gives them for the row alone."""
        input_ids, attention_mask = right_padded(input_ids, attention_mask)
        inputs = dict(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        if self.token_types:
            width = input_ids.shape[1]
            starts = torch.tensor([[width if r.second_text_start is None else r.second_text_start] for r in batch])
            inputs["token_type_ids"] = ((torch.arange(width) >= starts) & attention_mask.bool()).long().to(device)
        return inputs


def last_hidden_states(model, batch: list[Request], input_ids, attention_mask, encoder: Optional[EncoderReading]):
    """(hidden states of the last layer, after the final norm; the attention mask they line up with) of the
    model without its head (`base_model`: LlamaModel in LlamaForCausalLM), each row as the model computes it
    alone. The prompts come left-padded: a decoder reads them so, its positions counted from each row's
    first real token; an encoder reads them as `encoder` says."""
    device = model.device
    if encoder:
        inputs = encoder.inputs(batch, input_ids, attention_mask, device)
    else:
        mask = attention_mask.to(device)
        inputs = dict(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False,
                      position_ids=left_padded_positions(mask))
    return model.base_model(**inputs).last_hidden_state, inputs["attention_mask"]


def embed_prompts(model, batch: list[Request], input_ids, attention_mask, pooling: Pooling,
                  encoder: Optional[EncoderReading]) -> dict[int, pa.Array]:
    """Each prompt's embedding (by request key), as the model gives it for the prompt alone: the hidden
    states of its last layer, pooled."""
    with torch.inference_mode():
        hidden, mask = last_hidden_states(model, batch, input_ids, attention_mask, encoder)
        if pooling.kind == "mean":  # a masked sum as one matmul, not a float32 copy of every hidden state
            vectors = (mask[:, None, :].to(hidden.dtype) @ hidden).squeeze(1).float() / mask.sum(-1, keepdim=True)
        else:  # one token's: the first ([CLS]) or the last, the real tokens being in one run either way
            first = mask.argmax(-1)
            index = first if pooling.kind == "cls" else first + mask.sum(-1) - 1
            vectors = hidden[torch.arange(len(hidden), device=hidden.device), index].float()
        vectors = vectors[:, :pooling.dimensions]
        if pooling.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
    return {r.key: pa.array(v) for r, v in zip(batch, vectors.cpu().numpy())}


def right_padded(input_ids, attention_mask):
    """A left-padded batch with each row's padding moved to its end (the row rotated by its pad count)."""
    width = attention_mask.shape[1]
    index = (torch.arange(width) + (attention_mask == 0).sum(-1, keepdim=True)) % width
    return input_ids.gather(1, index), attention_mask.gather(1, index)


def classify_prompts(model, batch: list[Request], input_ids, attention_mask,
                     encoder: Optional[EncoderReading]) -> dict[int, tuple[str, pa.Array]]:
    """Each prompt's (likeliest label's name, every label's score), by request key. An encoder's head reads
    the prompt as alone (each architecture pools in its own way: BERT's pooler over [CLS], RoBERTa's head
    over <s>); a decoder's head (`score`) reads the last token's hidden state."""
    with torch.inference_mode():
        if encoder:
            logits = model(**encoder.inputs(batch, input_ids, attention_mask, model.device)).logits
        else:  # the head alone: transformers' own pooling looks for the last token by the pad id, which EOS may be
            logits = model.score(last_hidden_states(model, batch, input_ids, attention_mask, None)[0][:, -1])
        scores = label_scores(logits.float(), model.config).cpu()
    names = model.config.id2label
    return {r.key: (names[int(s.argmax())], pa.array(s.numpy())) for r, s in zip(batch, scores)}


def label_scores(logits, config):
    """The scores transformers' text-classification pipeline reports by default (`models.architecture.score_function`)."""
    function = score_function(config)
    return logits if function == "identity" else logits.sigmoid() if function == "sigmoid" else logits.softmax(-1)
