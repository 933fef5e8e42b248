"""Sequence classification (generation.classify): a forward pass of a classifier (a `*ForSequenceClassification`)
over the prompts of a micro-batch, each row's label scores as transformers' text-classification pipeline
gives them for the prompt alone."""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
import torch

from lmbatch.embedding import EncoderReading, last_hidden_states
from lmbatch.interface import Request
from lmbatch.models.architecture import score_function


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
    """The scores transformers' text-classification pipeline reports by default (`models.score_function`)."""
    function = score_function(config)
    return logits if function == "identity" else logits.sigmoid() if function == "sigmoid" else logits.softmax(-1)
