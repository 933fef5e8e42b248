"""generation.top_logprobs as Arrow: each generated token with its log-probability and the likeliest
tokens at its step, as the `token_logprobs` column holds them (`engine.types.TOKEN_LOGPROB`).

Built per sequence from the arrays `TokenLogprobs` (below) collects, and spelled from a table of
every token's text made once per replica, so a chunk of long texts (millions of entries) costs a few
Arrow calls per row, not a Python object per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import pyarrow as pa
import torch
from transformers import LogitsProcessor

from lmbatch.output.columns import TOKEN_LOGPROB, TOP_LOGPROB

if TYPE_CHECKING:  # types only: the engine imports this module, not the other way round
    from lmbatch.engine.types import Request


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


class TokenLogprobs:
    """The model's log-probability of each token generated, from its own scores: `first` runs before
    any processor (keeping those scores and their log-normalizer), `last` after all of them, where the
    token generate picks is the argmax of the scores it returns (decoding is greedy: the sampler leaves
    only its draw). No processor changes the picked token's score in place (Choices restores the scores
    of the tokens it keeps), so it is read from the kept scores without a copy of them. At the first
    step it also keeps the log-probabilities of `candidates` (sequences x k token ids), if given, and
    at every step those of the `top` likeliest tokens (generation.top_logprobs)."""

    class _Hook(LogitsProcessor):
        def __init__(self, see):
            self.see = see

        def __call__(self, input_ids, scores):
            self.see(scores)
            return scores

    def __init__(self, candidates: Optional[torch.Tensor] = None, top: int = 0):
        self.first, self.last = self._Hook(self._keep), self._Hook(self._take)
        self.scores = self.normalizer = None
        self.steps: list = []  # per decode step, each sequence's log-probability of its token
        self.candidates, self.first_step = candidates, None
        self.top, self.top_steps = top, []  # per decode step, (log-probabilities, ids) of the likeliest tokens

    def _keep(self, scores):
        self.scores, self.normalizer = scores, torch.logsumexp(scores.float(), dim=-1)
        if self.candidates is not None and not self.steps:
            self.first_step = scores.float().gather(1, self.candidates) - self.normalizer[:, None]
        if self.top:
            values, ids = scores.topk(self.top, dim=-1)
            self.top_steps.append((values.float() - self.normalizer[:, None], ids))

    def _take(self, final):
        chosen = final.argmax(dim=-1, keepdim=True)
        self.steps.append(self.scores.float().gather(1, chosen).squeeze(1) - self.normalizer)
        self.scores = self.normalizer = None

    def per_sequence(self) -> list[list[float]]:
        return torch.stack(self.steps, dim=1).tolist() if self.steps else []

    def top_per_sequence(self, sequences: int):
        """The likeliest tokens at each step: (their log-probabilities, their ids), numpy arrays of
        sequences x steps x top."""
        if not self.top_steps:
            empty = torch.zeros(sequences, 0, self.top)
            return empty.numpy(), empty.long().numpy()
        return tuple(torch.stack(x, dim=1).cpu().numpy() for x in zip(*self.top_steps))


def first_tokens(batch: list[Request], n: int) -> list[list[int]]:
    """Each sequence's choices' first tokens, padded with token 0 to the most choices of a row."""
    width = max(len(r.choices) for r in batch)
    return [[ids[0] for _, ids in r.choices] + [0] * (width - len(r.choices)) for r in batch for _ in range(n)]
