"""Engines made in the test process, and their output for a request alone."""

from __future__ import annotations

import collections

import torch
from transformers import LogitsProcessor

from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.engine.hf import HFEngine


def make_engine(path, kv_cache=None, **batching):
    return HFEngine.load(path, ModelConfig(path=path, dtype="float32", kv_cache=kv_cache), BatchingConfig(**batching),
                         device="cpu")


def alone(engine, request):
    """The oracle: this prompt alone, no padding, plain model.generate."""
    out = engine.model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                                do_sample=False, pad_token_id=engine.pad_id)
    return out[0, len(request.prompt_ids):].tolist()


class PenaltiesOneByOne(LogitsProcessor):
    """The oracle of OpenAI's presence and frequency penalties: the formula, token by token."""

    def __init__(self, presence, frequency, prompt_length):
        self.presence, self.frequency, self.start = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for i, row in enumerate(input_ids[:, self.start:].tolist()):
            for token, count in collections.Counter(row).items():
                scores[i, token] -= self.frequency * count + self.presence
        return scores


def logprob_alone(engine, request, **settings):
    """The oracle: model.generate on the prompt alone, its raw logits (before any processor) turned into
    the log-probability of each token, summed over the tokens the completion counts less an ending EOS."""
    out = engine.model.generate(torch.tensor([request.prompt_ids]), max_new_tokens=request.max_new_tokens,
                                do_sample=False, pad_token_id=engine.pad_id, eos_token_id=sorted(engine.eos_ids),
                                output_logits=True, return_dict_in_generate=True, **settings)
    tokens = out.sequences[0, len(request.prompt_ids):].tolist()
    c = engine.texts.finish(request, 0, tokens)
    counted = c.num_generated_tokens - (tokens[c.num_generated_tokens - 1] in engine.eos_ids)
    return c, sum(torch.log_softmax(out.logits[t][0], -1)[tokens[t]].item() for t in range(counted))


def labels(engine, *texts):
    """Choices as a Request holds them: (text, its token ids)."""
    return tuple((t, tuple(engine.tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts)
