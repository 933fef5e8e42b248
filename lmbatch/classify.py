"""Sequence classification (generation.classify): a forward pass of a classifier (a `*ForSequenceClassification`)
over the prompts of a micro-batch, each row's label scores as transformers' text-classification pipeline
gives them for the prompt alone."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
import torch

from lmbatch.embedding import EncoderReading, last_hidden_states
from lmbatch.interface import Request


def classify_prompts(model, batch: list[Request], input_ids, attention_mask,
                     encoder: Optional[EncoderReading]) -> dict[int, tuple[str, pa.Array]]:
    """Each prompt's (likeliest label's name, every label's score), by request key. An encoder's head reads
    the prompt as alone (each architecture pools in its own way: BERT's pooler over [CLS], RoBERTa's head
    over <s>); a decoder's head (`score`) reads the last token's hidden state."""
    with torch.inference_mode():
        if encoder:
            logits = model(**encoder.inputs(input_ids, attention_mask, model.device)).logits
        else:  # the head alone: transformers' own pooling looks for the last token by the pad id, which EOS may be
            logits = model.score(last_hidden_states(model, input_ids, attention_mask, None)[0][:, -1])
        scores = label_scores(logits.float(), model.config).cpu()
    names = model.config.id2label
    return {r.key: (names[int(s.argmax())], pa.array(s.numpy())) for r, s in zip(batch, scores)}


def label_scores(logits, config):
    """The scores transformers' text-classification pipeline reports by default: a regression head's
    outputs as they are, a sigmoid of each for a multi-label head or one of a single output (a
    reranker's relevance), else a softmax over the labels."""
    if config.problem_type == "regression":
        return logits
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return logits.sigmoid()
    return logits.softmax(-1)
