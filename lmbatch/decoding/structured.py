"""Structured output: texts held to a JSON schema or a regular expression (generation.json_schema,
generation.regex), as vLLM's guided decoding holds them.

outlines-core (`pip install 'lmbatch[structured]'`) turns a schema into a regular expression, and an
expression into an index over the tokenizer's vocabulary: for each state of the expression's
automaton, the tokens that keep a text inside it. `decoding.processors.Guided` walks a guide per row
through that index as the row generates. Nothing here imports torch: prepare workers check rows' schemas.
"""

from __future__ import annotations

import functools
import json
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Optional

from lmbatch.models.tokens import special_ids

if TYPE_CHECKING:
    from lmbatch.config import GenerationOptions

INSTALL = "pip install 'lmbatch[structured]' (or outlines-core)"
INDEXES_KEPT = 32
"""Compiled patterns a replica keeps (an index over a 150k-token vocabulary can take tens of MB)."""


class PatternError(ValueError):
    """A schema or expression that cannot hold a text; the message starts `invalid parameter:`."""


def pattern(g: GenerationOptions) -> Optional[str]:
    """The regular expression a row's text must match whole, or None for free text."""
    if g.regex is not None:
        return g.regex
    if g.json_schema is None:
        return None
    return _schema_pattern(json.dumps(g.json_schema), g.json_whitespace)  # in its order: fields are written in it


@functools.lru_cache(maxsize=256)
def _schema_pattern(schema: str, whitespace: Optional[str]) -> str:
    try:
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        raise PatternError(f"invalid parameter: generation.json_schema needs outlines-core: {INSTALL}") from None
    try:
        return build_regex_from_schema(schema, whitespace)
    except Exception as e:  # noqa: BLE001 - outlines-core raises several kinds for what it cannot follow
        raise PatternError(f"invalid parameter: json_schema {_short(schema)} cannot be followed: {e}") from None


def _short(text: str, most: int = 80) -> str:
    return text if len(text) <= most else text[:most - 3] + "..."


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level BPE token stands for (GPT-2's table: printable bytes
    stand for themselves, the others for characters from 256 on)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in kept]
    return {**{chr(b): b for b in kept}, **{chr(256 + n): b for n, b in enumerate(others)}}


BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, ended_ids) -> dict[bytes, list[int]]:
    """The bytes each token writes (the ids of each byte string), the special tokens and `ended_ids`
    (EOS) left out: a structured text holds none. Byte-level BPE tokens (GPT-2, Llama 3, Qwen) spell
    their bytes in GPT-2's alphabet; SentencePiece pieces (Llama 2, Mistral, Gemma) write a space as
    "▁" and a byte they have no piece for as <0xNN>."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise PatternError("invalid parameter: structured output needs a fast (tokenizers) tokenizer")
    decoder = json.dumps(json.loads(backend.to_str()).get("decoder"), ensure_ascii=False)
    alphabet = _byte_level_alphabet()
    if '"ByteLevel"' in decoder:
        def spelled(token: str) -> bytes:
            return bytes(alphabet[c] for c in token)
    elif '"ByteFallback"' in decoder or '"Metaspace"' in decoder or "▁" in decoder:
        def spelled(token: str) -> bytes:
            byte = BYTE_TOKEN.fullmatch(token)
            return bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode()
    else:
        raise PatternError("invalid parameter: structured output needs a tokenizer whose tokens are bytes "
                           "(byte-level BPE, as GPT-2, Llama 3 and Qwen have) or SentencePiece pieces "
                           f"(Llama 2, Mistral, Gemma); this one decodes with {decoder[:80]}")
    added = tokenizer.added_tokens_decoder  # written as their own text, not in the alphabet
    left_out = special_ids(tokenizer) | set(ended_ids)
    vocabulary: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i not in left_out:
            text = added[i].content.encode() if i in added else spelled(token)
            if text:
                vocabulary.setdefault(text, []).append(i)
    return vocabulary


class Indexes:
    """The index of each pattern over one tokenizer's vocabulary, compiled once per replica (the last
    INDEXES_KEPT of them kept), and a fresh guide through it per row. A pattern that cannot be compiled
    is remembered too: a column may repeat it on every row."""

    def __init__(self, tokenizer, ended_ids: set[int]):
        """`ended_ids`: the tokens that end a row (`models.architecture.ending_ids`); a text ends with the first of them."""
        try:
            from outlines_core import Vocabulary
        except ImportError:
            raise PatternError(f"invalid parameter: structured output needs outlines-core: {INSTALL}") from None
        if not ended_ids:
            raise PatternError("invalid parameter: structured output needs an EOS token to end a row with, and "
                               "the tokenizer and generation config name none")
        self.vocabulary = Vocabulary(min(ended_ids), token_bytes(tokenizer, ended_ids))
        self.indexes: OrderedDict = OrderedDict()
        self.refused: dict[str, str] = {}  # pattern -> why

    def index(self, regex: str):
        """The compiled index of `regex`; PatternError when no text of this vocabulary can match it."""
        from outlines_core import Index

        if regex in self.indexes:
            self.indexes.move_to_end(regex)
            return self.indexes[regex]
        if regex not in self.refused:
            try:
                self.indexes[regex] = Index(regex, self.vocabulary)
            except Exception as e:  # noqa: BLE001 - a syntax error, or no token sequence that matches
                self.refused[regex] = f"the pattern {_short(regex)!r} cannot be followed with this tokenizer: {e}"
            else:
                if len(self.indexes) > INDEXES_KEPT:
                    self.indexes.popitem(last=False)  # the least recently used
                return self.indexes[regex]
        raise PatternError(f"invalid parameter: {self.refused[regex]}")

    def guide(self, regex: str):
        from outlines_core import Guide

        return Guide(self.index(regex))


