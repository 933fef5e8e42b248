"""One row's prompt and settings: the template filled from its columns, its chat messages rendered,
its pair, and its per-row generation settings read as their types. A bad row raises RowError.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
from typing import Optional

from lmbatch.config import PER_ROW_PARAMETERS, ConfigError, GenerationOptions
from lmbatch.decoding.structured import PatternError, pattern
from lmbatch.errors import RowError
from lmbatch.prepare.settings import PrepareSettings


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
