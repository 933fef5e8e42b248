"""generation.top_logprobs as Arrow: each generated token with its log-probability and the likeliest
tokens at its step, as the `token_logprobs` column holds them (`interface.TOKEN_LOGPROB`).

Built per sequence from the arrays `processors.TokenLogprobs` collects, and spelled from a table of
every token's text made once per replica, so a chunk of long texts (millions of entries) costs a few
Arrow calls per row, not a Python object per token.
"""

from __future__ import annotations

import pyarrow as pa

from lmbatch.engine.types import TOKEN_LOGPROB, TOP_LOGPROB


class TokenTexts:
    def __init__(self, tokenizer, vocab_size: int):
        """Each token's text alone (special tokens spelled out, a piece of a character as U+FFFD), for
        ids up to the larger of the tokenizer's and the model's vocabularies (those past the tokenizer's
        are empty)."""
        size = max(len(tokenizer), vocab_size)
        self.texts = pa.array(tokenizer.batch_decode([[i] for i in range(size)]), pa.string())

    def tokens(self, ids, logprobs) -> pa.StructArray:
        """TOP_LOGPROBs: the tokens' ids, their texts, their log-probabilities."""
        ids = pa.array(ids, pa.int64())
        return pa.StructArray.from_arrays([ids, self.texts.take(ids), pa.array(logprobs, pa.float64())],
                                          fields=list(TOP_LOGPROB))

    def token_logprobs(self, tokens: list[int], logprobs: list[float], top_logprobs, top_ids) -> pa.StructArray:
        """A sequence's counted tokens as TOKEN_LOGPROBs, each with the likeliest tokens at its step
        (`top_logprobs`, `top_ids`: numpy arrays of tokens x top)."""
        offsets = pa.array(range(0, top_ids.size + 1, top_ids.shape[1]), pa.int32())
        top = pa.ListArray.from_arrays(offsets, self.tokens(top_ids.ravel(), top_logprobs.ravel()))
        return pa.StructArray.from_arrays([*self.tokens(tokens, logprobs).flatten(), top], fields=list(TOKEN_LOGPROB))
