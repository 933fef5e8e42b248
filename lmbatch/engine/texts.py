"""From new tokens to a row's text: decoded with the job's tokenizer (special tokens left out), cut at an
ending token or the first stop string, `stop` told from `length`, and the true tokens counted. Every
engine that hands back token ids finishes its rows here, so that their texts agree token for token.
"""

from __future__ import annotations

from lmbatch.engine.types import Completion, Request


class Texts:
    def __init__(self, tokenizer, eos_ids: set[int]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        # Texts never show special tokens, so a stop string that spells one is looked for as the token.
        self.special_tokens = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}

    def ends(self, stop: tuple[str, ...]) -> frozenset[int]:
        """The tokens that end a row: an EOS, or a special token one of its stop strings spells (a chat
        model's "<|im_end|>", where its generation config names only the base model's EOS)."""
        return frozenset({*self.eos_ids, *(self.special_tokens[s] for s in stop if s in self.special_tokens)})

    def finish(self, r: Request, sample: int, tokens: list[int]) -> Completion:
        """Cut at an ending token (`ends`) or the first stop string; tell `stop` from `length`; count true
        tokens."""
        ends = self.ends(r.params.stop)
        eos = next((n for n, t in enumerate(tokens) if t in ends), None)
        # The stop string is looked for before the EOS too: a row that a stop string ended while its
        # neighbours went on is padded, and where the tokenizer has no pad token (GPT-2, Llama 3)
        # the padding is EOS, right after the stop string.
        body = tokens if eos is None else tokens[:eos]
        chosen = next((text for text, ids in r.choices if list(ids) == body), None)
        if chosen is not None and eos is not None:  # the choice's own text, however the tokenizer decodes it
            return Completion(r.key, sample, chosen, eos + 1, "stop")
        text = self.decode(body)
        hits = sorted((text.find(s), s) for s in r.params.stop if s in text)
        if hits:
            cut, stop = hits[0]
            return Completion(r.key, sample, text[:cut], self._tokens_until(body, stop), "stop")
        if eos is not None:
            return Completion(r.key, sample, text, eos + 1, "stop")
        # Without EOS or a stop string only the token limit ends a row.
        return Completion(r.key, sample, text, len(tokens), "length")

    def _tokens_until(self, tokens: list[int], stop: str) -> int:
        """Fewest tokens whose text holds the stop string: the tokens generated until it was complete."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if stop in self.decode(tokens[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)
