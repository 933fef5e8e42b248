"""Fitting a prompt into the model's context (input.on_too_long): an error row, the start cut (a chat
drops its oldest turns, keeping the system message), or the end cut (plain prompts, for embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from lmbatch.config import GenerationOptions
from lmbatch.errors import RowError
from lmbatch.models.tokens import encode
from lmbatch.prepare.rows import render_chat
from lmbatch.prepare.settings import PrepareSettings


def fit_to_context(ids: list[int], s: PrepareSettings, g: GenerationOptions,
                   special: frozenset = frozenset(), second_start: Optional[int] = None) -> tuple[list[int], int]:
    """Apply max_length, the model's context, max_prompt_tokens and on_too_long; return (prompt ids, max
    new tokens).
    Truncating keeps the special tokens the prompt starts with (`special`: the BOS that Llama,
    Mistral and Gemma tokenizers put first, without which such a model drifts) and cuts after them;
    truncate_end keeps those it ends with (the EOS an embedding model's tokenizer puts last, whose
    hidden state is the embedding) and cuts before them; a pair's (`second_start`: where its second text
    begins) it cuts in the second text only."""
    max_new = g.max_new_tokens
    if g.max_length is not None:
        max_new = min(max_new, g.max_length - len(ids))
        if max_new < min(1, g.max_new_tokens):  # a row that only scores its prompt needs none
            raise RowError(f"too long: prompt has {len(ids)} tokens, leaving none under max_length={g.max_length}")
    limits = [(s.context_limit - max_new, f"with max_new_tokens={max_new} it exceeds the model's context of "
                                          f"{s.context_limit}")] if s.context_limit is not None else []
    if s.max_prompt_tokens is not None:
        limits.append((s.max_prompt_tokens, f"it exceeds input.max_prompt_tokens={s.max_prompt_tokens}"))
    room, over = min(limits, default=(len(ids), ""))
    if len(ids) > room:
        head = next((n for n, t in enumerate(ids) if t not in special), len(ids))
        tail = next((n for n, t in enumerate(reversed(ids)) if t not in special), len(ids))
        if s.on_too_long == "truncate" and room > head:
            ids = ids[:head] + ids[-(room - head):]  # and the end of the prompt: that is what the model continues
        elif s.on_too_long == "truncate_end" and room > tail:
            if second_start is not None and room - tail <= second_start:
                raise RowError(f"too long: pair has {len(ids)} tokens; {over}, and its first text takes "
                               f"{second_start} of the {room} tokens it may have (input.on_too_long=truncate_end "
                               "cuts the second text only)")
            ids = ids[:room - tail] + ids[len(ids) - tail:]
        else:
            raise RowError(f"too long: prompt has {len(ids)} tokens; {over} (input.on_too_long=truncate keeps the "
                           "end, truncate_end the start)")
    return ids, max_new


def drop_oldest_turns(messages: list[dict], ids: list[int], s: PrepareSettings, g: GenerationOptions,
                      tokenizer) -> list[int]:
    """The token ids of a chat that fits the context: while it does not, its oldest turns go, the
    system message kept and a user turn first (OpenAI's truncation="auto" does the same), down to
    the last turn, which fit_to_context then cuts like a plain prompt if it still does not fit."""
    strict = dataclasses.replace(s, on_too_long="error")

    def fits(candidate: list[int]) -> bool:
        try:
            fit_to_context(candidate, strict, g)
            return True
        except RowError:
            return False

    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    if len(turns) <= 1 or fits(ids):
        return ids
    # Where the kept turns may begin: at a user turn, or at the last turn. Fewer turns never render
    # longer, so the first start that fits is found by bisection: a long chat is rendered and
    # tokenized a few times, not once per turn dropped.
    starts = [k for k in range(1, len(turns) - 1) if turns[k]["role"] == "user"] + [len(turns) - 1]
    rendered: dict[int, list[int]] = {}

    def kept(start: int) -> list[int]:
        if start not in rendered:
            chat = render_chat(tokenizer, system + turns[start:], s.chat_template_kwargs, s.chat_template)
            rendered[start] = encode(tokenizer, [chat], add_special_tokens=False)[0]
        return rendered[start]

    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(kept(starts[mid])) else (mid + 1, hi)
    return kept(starts[lo])
