"""The logits processors `engine.hf` steers transformers' `generate` with.

Each works per row, so that a row's output does not depend on its micro-batch neighbours: sampling
from the row's own seeded stream, choices, structured output (a JSON schema or a regular expression),
the repetition penalty (blind to left padding) and OpenAI's presence and frequency penalties. The
model's own log-probabilities are read in `logprobs`, stop strings checked in `stopping`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from transformers import LogitsProcessor

if TYPE_CHECKING:  # types only: the engine imports this module, not the other way round
    from lmbatch.engine.types import SamplingParams



class PerRowSampler(LogitsProcessor):
    """Sample each sequence from its own seeded stream, as a logits processor.

    transformers samples a whole batch from one global random stream, so a row's draws would
    depend on its batch neighbours. Here every (row, sample) draws its uniforms up front, one per
    step, from a generator seeded from the row's id: its text is the same however rows are
    chunked, batched or spread over replicas. A step then samples the whole batch at once, by
    inverse CDF over the top-k and top-p candidates (a multinomial per row per step, in a Python
    loop, cost more than the model's own step). The chosen token is returned as the only finite
    score, and generate decodes greedily.
    """

    def __init__(self, params: SamplingParams, seeds: list[int], device, steps: int):
        self.temperature, self.top_k, self.top_p, self.min_p = (params.temperature, params.top_k, params.top_p,
                                                                params.min_p)
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seed))
                                     for seed in seeds]).to(device)
        self.step = 0

    def distribution(self, scores):
        """(probabilities, their tokens or None for all) of each row, as transformers' temperature,
        top-k, top-p and min-p warpers leave them (the probabilities not normalized)."""
        scores = scores.float() / self.temperature
        if self.top_k and self.top_k < scores.shape[-1]:
            values, tokens = scores.topk(self.top_k)  # largest first
        elif self.top_p < 1.0:
            values, tokens = scores.sort(descending=True)
        else:
            values, tokens = scores, None
        probs = torch.softmax(values, dim=-1)
        if self.top_p < 1.0:  # the nucleus: largest first, while those before hold under top_p
            probs = probs * (probs.cumsum(-1) - probs < self.top_p)
        if self.min_p:  # relative to the likeliest, so the nucleus need not be normalized first
            probs = probs * (probs >= self.min_p * probs.amax(-1, keepdim=True))
        return probs, tokens

    def __call__(self, input_ids, scores):
        probs, tokens = self.distribution(scores)
        cdf = probs.cumsum(-1)
        total = cdf[:, -1:]
        if not bool(torch.isfinite(total).all() and (total > 0).all()):
            raise ValueError("probability tensor contains either inf, nan or element < 0")  # as multinomial says
        x = self.uniforms[:, self.step, None] * total
        self.step += 1
        # The first candidate whose CDF passes x has a positive probability; x rounded up to the
        # total finds none, and takes the last candidate that has one.
        last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), 0).amax(-1, keepdim=True)
        chosen = torch.minimum(torch.searchsorted(cdf, x, right=True), last)
        if tokens is not None:
            chosen = tokens.gather(1, chosen)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


class Choices(LogitsProcessor):
    """Keep, for each row with choices, only the tokens that continue one of them, and an EOS once
    one is complete (the only token left when no longer choice continues it), so its text is exactly
    one of them. Greedy, a row thus takes the likeliest token among those at each step (as guided
    choice does in vLLM), not the choice likeliest as a whole. Rows without choices are untouched."""

    END = -1  # marks a complete choice in the trie

    def __init__(self, choices: list[tuple[tuple[str, tuple[int, ...]], ...]], prompt_length: int, eos: int):
        self.tries: list[Optional[dict]] = [self._trie(c) if c else None for c in choices]
        self.start, self.eos = prompt_length, eos

    @classmethod
    def _trie(cls, choices) -> dict:
        root: dict = {}
        for _, ids in choices:
            node = root
            for t in ids:
                node = node.setdefault(t, {})
            node[cls.END] = {}
        return root

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.start:].tolist()
        rows, tokens = [], []
        for i, node in enumerate(self.tries):
            for t in generated[i] if node is not None else ():
                node = node.get(t)
                if node is None:  # ended (an EOS, then padding): what it is given no longer matters
                    break
            if node is not None:
                allowed = [self.eos if t == self.END else t for t in node]
                rows += [i] * len(allowed)
                tokens += allowed
        if rows:  # in place: a copy of the scores (rows x vocabulary) would double their memory
            rows_t = torch.tensor(rows, device=scores.device)
            tokens_t = torch.tensor(tokens, device=scores.device)
            kept = scores[rows_t, tokens_t]
            scores[rows_t.unique()] = float("-inf")
            scores[rows_t, tokens_t] = kept
        return scores


class Guided(LogitsProcessor):
    """Keep, for each row held to a pattern (generation.json_schema or regex), only the tokens its guide
    allows: those after which the text can still match the pattern, and an EOS once it matches whole
    (the only token left when nothing may follow). Rows without a guide are untouched.

    A guide (outlines-core's) steps through the pattern's index one generated token at a time and
    writes the tokens it allows as a bitmask, 32 tokens to a word, which is unpacked on the scores'
    device. The scores of the allowed tokens are kept as they are (TokenLogprobs reads the chosen one's
    from them)."""

    def __init__(self, guides: list, prompt_length: int):
        self.guides, self.start = guides, prompt_length
        self.rows = [i for i, g in enumerate(guides) if g is not None]

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.start:  # the token each row took at the last step
            last = input_ids[:, -1].tolist()
            for i in list(self.rows):
                try:
                    self.guides[i].advance(last[i], return_tokens=False)
                except ValueError:  # ended (an EOS, a stop string, then padding): what it is given no longer matters
                    self.rows.remove(i)
        if not self.rows:
            return scores
        words = (scores.shape[-1] + 31) // 32
        bitmask = torch.zeros((len(self.rows), words), dtype=torch.int32)
        for k, i in enumerate(self.rows):
            self.guides[i].write_mask_into(bitmask[k].data_ptr(), words, 4)
        bits = 1 << torch.arange(8, dtype=torch.uint8, device=scores.device)  # a word's bytes, lowest first
        bytes_ = bitmask.to(scores.device).view(torch.uint8)
        blocked = ((bytes_[:, :, None] & bits) == 0).view(len(self.rows), -1)[:, :scores.shape[-1]]
        if len(self.rows) < len(scores):  # rows without a guide, or ended, keep every token
            blocked = torch.zeros_like(scores, dtype=torch.bool).index_copy_(
                0, torch.tensor(self.rows, device=scores.device), blocked)
        return scores.masked_fill_(blocked, float("-inf"))  # in place: a copy of the scores would double them


class RepetitionPenalty(LogitsProcessor):
    """transformers' repetition penalty (a seen token's score divided by the penalty, or multiplied where
    negative), blind to each row's left padding as generate is since transformers 5: padding is often
    the EOS, which a batch would otherwise penalize in every row that has neighbours longer than it.
    lmbatch applies it itself, after `TokenLogprobs.first` reads the model's own scores, and the same
    on every transformers version."""

    def __init__(self, penalty: float, attention_mask):
        self.penalty, self.padding = penalty, attention_mask == 0

    def __call__(self, input_ids, scores):
        vocabulary = scores.shape[-1]
        padding = torch.nn.functional.pad(self.padding, (0, input_ids.shape[1] - self.padding.shape[1]))
        seen = input_ids.masked_fill(padding, vocabulary)  # padding points at an extra column, then dropped
        widened = torch.nn.functional.pad(scores, (0, 1))
        score = widened.gather(1, seen)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return widened.scatter(1, seen, score)[:, :vocabulary]


class OutputPenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties, as vLLM applies them: a token's score loses
    `frequency` times the count of it among the tokens the row has generated so far, and `presence`
    once if it is among them at all. The prompt's tokens do not count (unlike the repetition penalty).

    Worked out on the generated tokens (rows x steps), then added to a copy of the scores in one
    scatter: the scores (rows x vocabulary, 300 MB at 512 rows of a 150k vocabulary in float32) are
    copied once, and never changed in place, as `TokenLogprobs` reads the model's own from them."""

    def __init__(self, presence: float, frequency: float, prompt_length: int):
        self.presence, self.frequency, self.start = presence, frequency, prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.start:].sort(dim=1).values
        first = torch.ones_like(generated, dtype=torch.bool)  # a token's first occurrence in its sorted row
        first[:, 1:] = generated[:, 1:] != generated[:, :-1]
        penalty = self.frequency + self.presence * first.to(scores.dtype)
        return scores.scatter_add(1, generated, -penalty)


