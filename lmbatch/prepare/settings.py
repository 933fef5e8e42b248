"""What the prepare stage needs to know of the job (`PrepareSettings`, made by the plan), and the
columns it adds to a chunk's rows for the replica, which drops the underscored ones before writing.
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from lmbatch.config import GenerationOptions

# Columns the prepare step adds; the replica consumes them and the writer drops the underscored ones.
CHUNK, CHUNK_ROWS, ROW = "_chunk", "_chunk_rows", "_row"
PROMPT_IDS, MAX_NEW, ERROR, PARAMS = "_prompt_ids", "_max_new_tokens", "_error", "_params"
CHOICES = "_choices"  # the token ids of each of a row's generation.choices
SECOND_TEXT = "_second_text_start"  # where a pair's second text begins in its prompt ids (input.pair_column)
NUM_PROMPT_TOKENS = "num_prompt_tokens"
READ_RETRIES = b"lmbatch.storage_retries"
"""Schema metadata of a prepared table: the storage retries (JSON, by kind) its read and prepare made."""



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
    """The input's columns and types, merged over its files (`input.files.inspect_inputs`)."""

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
