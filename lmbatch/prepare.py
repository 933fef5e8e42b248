"""Per-row preparation, run in Ray CPU tasks: validate, render the prompt, tokenize, count.

A bad row is never raised: it is marked with a readable `_error` and still travels to the
output, so every input row is accounted for.
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import math
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

import pyarrow as pa

from lmbatch.config import PER_ROW_PARAMETERS, ConfigError, GenerationOptions
from lmbatch.input.chunks import Chunk, read_chunk
from lmbatch.tokens import encode, encode_pairs, load_tokenizer, special_ids
from lmbatch.errors import RowError
from lmbatch.decoding.structured import PatternError, pattern

# Columns the prepare step adds; the replica consumes them and the writer drops the underscored ones.
CHUNK, CHUNK_ROWS, ROW = "_chunk", "_chunk_rows", "_row"
PROMPT_IDS, MAX_NEW, ERROR, PARAMS = "_prompt_ids", "_max_new_tokens", "_error", "_params"
CHOICES = "_choices"  # the token ids of each of a row's generation.choices
SECOND_TEXT = "_second_text_start"  # where a pair's second text begins in its prompt ids (input.pair_column)
NUM_PROMPT_TOKENS = "num_prompt_tokens"


@dataclass(frozen=True)
class PrepareSettings:
    input_uri: str
    prompt_column: str
    passthrough_columns: tuple[str, ...]
    """Input columns copied to the output (the id column first)."""
    tokenizer_path: str
    generation: GenerationOptions
    """The job's generation settings; param_columns override them per row."""
    param_columns: tuple[str, ...] = ()
    adapters: tuple[str, ...] = ()
    """The names of model.adapters, one of which a row's adapter must be."""
    context_limit: Optional[int] = None
    """Positions the model supports; a prompt plus its new tokens must fit."""
    max_prompt_tokens: Optional[int] = None
    """input.max_prompt_tokens: a prompt must fit under it too."""
    on_too_long: str = "error"
    template: Optional[str] = None
    pair_column: Optional[str] = None
    """input.pair_column: each prompt is read with this column's text as a pair."""
    chat: bool = False
    """Render with the tokenizer's chat template (then no extra special tokens are added)."""
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    """Variables for the chat template besides the messages (input.chat_template_kwargs)."""
    chat_template: Optional[str] = None
    """The job's own chat template (input.chat_template), rendered with instead of the tokenizer's."""
    system_prompt: Optional[str] = None
    trust_remote_code: bool = False
    tokenizer_class: Optional[str] = None
    """The tokenizer's class as `direct_class_path` gives it: workers load it without AutoTokenizer."""
    tokenizer_revision: Optional[str] = None
    """The hub commit the plan pinned (model.revision); None for a local model."""
    input_schema: Optional[pa.Schema] = None
    """The input's columns and types, merged over its files (`io.inspect_inputs`)."""

    @property
    def row_columns(self) -> list[str]:
        """The columns each row is checked and rendered from (the id first)."""
        needed = [self.passthrough_columns[0], self.prompt_column, *([self.pair_column] if self.pair_column else []),
                  *self.param_columns, *template_fields(self.template)]
        return list(dict.fromkeys(needed))

    @property
    def read_columns(self) -> list[str]:
        return list(dict.fromkeys([*self.row_columns, *self.passthrough_columns]))


def template_fields(template: Optional[str]) -> list[str]:
    """Column names used by `{column}` placeholders (`{tags[0]}` and `{meta.lang}` use tags and meta)."""
    if not template:
        return []
    names = (name for _, name, _, _ in string.Formatter().parse(template) if name)
    return list(dict.fromkeys(re.split(r"[.\[]", name, maxsplit=1)[0] for name in names))


def row_prompt(row: dict, s: PrepareSettings) -> str | list[dict]:
    """What the model continues: the prompt, templated, as text, or a chat as its messages."""
    value = row.get(s.prompt_column)
    if value is None:
        raise RowError(f"null prompt: column {s.prompt_column!r} is null")
    if isinstance(value, list):
        messages = _messages(value, s.prompt_column)
    elif not isinstance(value, str):
        raise RowError(f"not a string: column {s.prompt_column!r} holds {type(value).__name__}")
    else:
        text = value
        if s.template:
            try:
                text = s.template.format_map(row)
            except Exception as e:  # noqa: BLE001 - e.g. {tags[0]} on a row whose tags are null
                raise RowError(f"template: input.template cannot be filled from this row: {e!r}") from None
        if not text.strip():
            raise RowError(f"empty prompt: column {s.prompt_column!r} is empty or whitespace")
        if not s.chat:
            return text
        messages = [{"role": "user", "content": text}]
    # A row's own system message wins: two would render as two (most templates) or fail the row.
    if s.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": s.system_prompt}, *messages]
    return messages


def row_pair(row: dict, s: PrepareSettings) -> str:
    """The second text of the row's pair (input.pair_column)."""
    value = row.get(s.pair_column)
    if value is None:
        raise RowError(f"null pair: column {s.pair_column!r} is null")
    if not value.strip():  # a string: the plan checked the column's type
        raise RowError(f"empty pair: column {s.pair_column!r} is empty or whitespace")
    return value


def render_chat(tokenizer, messages: list[dict], variables: dict, template: Optional[str] = None) -> str:
    """The messages as the model reads them, with the prompt for its turn: rendered with `template`, or the
    tokenizer's own chat template."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             chat_template=template, **variables)
    except Exception as e:  # noqa: BLE001 - templates raise on what they refuse, e.g. roles that do not alternate
        raise RowError(f"chat template: {e}") from None


def _messages(value: list, column: str) -> list[dict]:
    """Validate a chat: a non-empty list of {role, content}, with a string role and content text."""
    if not value:
        raise RowError(f"empty prompt: column {column!r} holds no messages")
    messages = []
    for m in value:
        text = _text(m.get("content")) if isinstance(m, dict) else None
        if text is None or not isinstance(m.get("role"), str):
            raise RowError(f"bad messages: column {column!r} needs a list of {{role, content}}, the content a string "
                           f"or a list of text parts, got {m!r}")
        messages.append({"role": m["role"], "content": text})
    return messages


def _text(content) -> Optional[str]:
    """A message's content as text: a string, or OpenAI-style parts that are all text
    ([{"type": "text", "text": ...}, ...], as datasets made for multimodal models hold even
    for text), joined by newlines, which every chat template reads. None for anything else."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


HELD_TO = {"choices": [], "json_schema": None, "regex": None}
"""The settings that say what a text may be, unset: a row that sets one sets the others so."""


def row_generation(row: dict, s: PrepareSettings) -> tuple[GenerationOptions, Optional[dict]]:
    """The row's generation settings: the job's, overridden by its non-null parameter columns."""
    overrides = {c: row_setting(c, row[c]) for c in s.param_columns if not _missing(row.get(c))}
    if not overrides:
        return s.generation, None
    if HELD_TO.keys() & overrides.keys():  # a row's own choices, schema or regex replaces the job's
        overrides = {**HELD_TO, **overrides}
    if overrides.get("adapter") == "":  # the model alone, where generation.adapter names one for the job
        overrides["adapter"] = None
    try:
        g = dataclasses.replace(s.generation, **overrides)
        if g.adapter is not None and g.adapter not in s.adapters:
            raise RowError(f"invalid parameter: adapter {g.adapter!r} is not one of model.adapters "
                           f"({', '.join(s.adapters)})")
        if "json_schema" in overrides:
            pattern(g)  # one outlines-core cannot follow is an error row here, not in the replica
        return g, overrides
    except ConfigError as e:  # a value out of range (row_setting made the types right)
        raise RowError(f"invalid parameter: {str(e).replace('generation.', '')}") from None
    except PatternError as e:
        raise RowError(str(e)) from None


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # NaN: pandas' and polars' null


def row_setting(name: str, value):
    """A cell of a parameter column as the setting's type (PER_ROW_PARAMETERS): a whole float as an
    int (pandas writes an integer column with nulls as float64), one stop string as a list of one."""
    kind = PER_ROW_PARAMETERS[name]
    if kind in ("integer", "number") and isinstance(value, (int, float, decimal.Decimal)) \
            and not isinstance(value, bool) and math.isfinite(value):
        if kind == "number":
            return float(value)
        if value == int(value):
            return int(value)
    elif kind == "boolean" and isinstance(value, bool):
        return value
    elif kind == "string" and isinstance(value, str):
        return value
    elif kind == "strings" and isinstance(value, str):
        return [value]
    elif kind == "strings" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    what = {"integer": "a whole number", "number": "a number", "boolean": "true or false",
            "strings": "a string or a list of strings", "string": "a string"}[kind]
    raise RowError(f"invalid parameter: {name} must be {what}, got {value!r}")


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
