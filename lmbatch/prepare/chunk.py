"""A chunk prepared, in a Ray CPU task: its rows read, checked, rendered, tokenized and counted.

A bad row is never raised: it is marked with a readable `_error` and still travels to the
output, so every input row is accounted for.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import pyarrow as pa

from lmbatch.config import GenerationOptions
from lmbatch.errors import RowError
from lmbatch.input.chunks import Chunk, read_chunk
from lmbatch.models.tokens import encode, encode_pairs, load_tokenizer, special_ids
from lmbatch.prepare.context import drop_oldest_turns, fit_to_context
from lmbatch.prepare.rows import render_chat, row_generation, row_pair, row_prompt
from lmbatch.prepare.settings import (
    CHOICES,
    CHUNK,
    CHUNK_ROWS,
    ERROR,
    MAX_NEW,
    NUM_PROMPT_TOKENS,
    PARAMS,
    PROMPT_IDS,
    ROW,
    SECOND_TEXT,
    PrepareSettings,
)


def with_choices(g: GenerationOptions, tokenizer, cache: dict) -> tuple[list[list[int]], GenerationOptions]:
    """The token ids of a row's choices, and its settings with as many new tokens as the longest
    needs, and one more for the EOS that ends it (`cache`: choices tokenized so far in the chunk)."""
    choices = tuple(g.choices)
    if choices not in cache:
        cache[choices] = encode(tokenizer, list(choices), add_special_tokens=False)
    ids = cache[choices]
    empty = [c for c, t in zip(choices, ids) if not t]
    if empty:
        raise RowError(f"invalid parameter: choice {empty[0]!r} has no tokens")
    return ids, dataclasses.replace(g, max_new_tokens=max(map(len, ids)) + 1)


def prepare_chunk(chunk: Chunk, s: PrepareSettings, duplicate_rows: Sequence[int] = ()) -> pa.Table:
    """Read one chunk and add the columns the replica needs; one output row per input row.

    duplicate_rows: positions in the chunk whose id appeared earlier in the input (error rows).
    """
    table = read_chunk(s.input_uri, chunk, s.read_columns, s.input_schema)
    rows = table.select(s.row_columns).to_pylist()  # kept columns stay in Arrow: they are only copied
    id_column = s.passthrough_columns[0]
    duplicates = set(duplicate_rows)
    tokenizer = load_tokenizer(s.tokenizer_path, s.trust_remote_code, s.tokenizer_class, s.tokenizer_revision)
    texts: dict[int, str | tuple[str, str]] = {}  # a pair of texts where input.pair_column is set
    chats: dict[int, list[dict]] = {}  # the messages of chat rows, which truncation drops turns of
    errors: list[Optional[str]] = [None] * len(rows)
    settings: list[GenerationOptions] = [s.generation] * len(rows)
    overrides: list[Optional[str]] = [None] * len(rows)
    for i, row in enumerate(rows):
        try:
            if row[id_column] is None:
                raise RowError(f"null id: column {id_column!r} is null")
            if i in duplicates:
                raise RowError(f"duplicate id: {row[id_column]!r} appeared earlier in the input")
            settings[i], changed = row_generation(row, s)
            overrides[i] = json.dumps(changed) if changed else None
            prompt = row_prompt(row, s)
            if isinstance(prompt, list):
                chats[i] = prompt
                prompt = render_chat(tokenizer, prompt, s.chat_template_kwargs, s.chat_template)
            texts[i] = (prompt, row_pair(row, s)) if s.pair_column else prompt
        except RowError as e:
            errors[i] = str(e)

    special = special_ids(tokenizer)
    second_start: list[Optional[int]] = [None] * len(rows)
    if s.pair_column and texts:
        encoded = []
        for i, (ids, start) in zip(texts, encode_pairs(tokenizer, list(texts.values()), special)):
            encoded.append(ids)
            second_start[i] = start
    else:  # a chat template already holds the special tokens the model expects
        encoded = encode(tokenizer, list(texts.values()), add_special_tokens=not s.chat) if texts else []
    prompt_ids: list[Optional[list[int]]] = [None] * len(rows)
    counts: list[Optional[int]] = [None] * len(rows)
    max_new: list[int] = [0] * len(rows)
    choice_ids: list[Optional[list[list[int]]]] = [None] * len(rows)
    tokenized_choices: dict[tuple[str, ...], list[list[int]]] = {}
    for i, ids in zip(texts, encoded):
        counts[i] = len(ids)  # the true count, before any truncation
        try:
            if settings[i].choices:
                choice_ids[i], settings[i] = with_choices(settings[i], tokenizer, tokenized_choices)
            if i in chats and s.on_too_long == "truncate":
                ids = drop_oldest_turns(chats[i], ids, s, settings[i], tokenizer)
            ids, new = fit_to_context(ids, s, settings[i], special, second_start[i])
            if choice_ids[i] and new < settings[i].max_new_tokens:  # a choice cut short is none of them
                raise RowError(f"too long: prompt has {len(ids)} tokens, leaving {new} under max_length="
                               f"{settings[i].max_length}, and the longest choice and an EOS take "
                               f"{settings[i].max_new_tokens}")
            prompt_ids[i], max_new[i] = ids, new
        except RowError as e:
            errors[i] = str(e)

    out = table.select(list(s.passthrough_columns))
    extra = {
        CHUNK: pa.array([chunk.id] * len(rows), pa.string()),
        CHUNK_ROWS: pa.array([chunk.num_rows] * len(rows), pa.int64()),
        ROW: pa.array(range(len(rows)), pa.int64()),
        PROMPT_IDS: pa.array(prompt_ids, pa.list_(pa.int32())),
        NUM_PROMPT_TOKENS: pa.array(counts, pa.int64()),
        MAX_NEW: pa.array(max_new, pa.int64()),
        ERROR: pa.array(errors, pa.string()),
        PARAMS: pa.array(overrides, pa.string()),
        CHOICES: pa.array(choice_ids, pa.list_(pa.list_(pa.int32()))),
        SECOND_TEXT: pa.array(second_start, pa.int64()),
    }
    for name, column in extra.items():
        out = out.append_column(name, column)
    return out
