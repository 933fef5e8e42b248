"""The `input` group: where the prompts are and how a row becomes a prompt (conf/generate.yaml's input:).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

from lmbatch.config.checks import require
from lmbatch.config.generation import PER_ROW_PARAMETERS


@dataclass
class InputConfig:
    path: str = "builtin://sample_prompts"
    """Parquet file, directory, glob or URI (s3://...). `builtin://sample_prompts` is the bundled set."""
    prompt_column: str = "prompt"
    """Column holding the prompt text."""
    id_column: str = "id"
    """Column that identifies a row; copied to every output row."""
    keep_columns: Optional[list[str]] = None
    """Input columns copied to the output besides the id; null keeps them all, [] keeps none."""
    template: Optional[str] = None
    """Optional prompt template with `{column}` placeholders filled from the row."""
    pair_column: Optional[str] = None
    """Column of a second text read with each prompt as a pair, for an encoder that reads two (a cross-encoder
    reranker: query and passage; an NLI classifier: premise and hypothesis), joined as its tokenizer joins
    them (BERT: `[CLS] prompt [SEP] pair [SEP]`). Plain prompts only; too long, a pair is an error row, or with
    input.on_too_long=truncate_end cut at the end of its second text."""
    messages_column: Optional[str] = None
    """Column of chat messages (a list of {role, content}) used instead of prompt_column."""
    system_prompt: Optional[str] = None
    """System message put before each row's messages (implies the chat template); a row whose
    messages begin with a system message keeps its own."""
    apply_chat_template: bool = False
    """Render plain prompts as one user message with the tokenizer's chat template."""
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    """Variables for the chat template besides the messages (implies the chat template), e.g.
    `{enable_thinking: false}` (Qwen3: answer without thinking first) or `{reasoning_effort: low}`
    (gpt-oss). A variable the template does not read stops the job at the start."""
    chat_template: Optional[str] = None
    """A chat template (Jinja, as in a tokenizer's config) to render with instead of the tokenizer's, or
    a file that holds one (as vLLM's --chat-template): for a base model that has none, or another
    format. Implies the chat template. The template, not the file's name, is part of the job."""
    on_too_long: str = "error"
    """A prompt longer than the model's context minus max_new_tokens: an `error` row; `truncate` from the left
    (keeping the end, which the model continues; a chat drops its oldest turns); or `truncate_end` (keeping
    the start, as embedding models are trained to read a long text; plain prompts only)."""
    max_prompt_tokens: Optional[int] = None
    """A cap on a prompt's tokens below the model's context (texts embedded at the length the model was
    trained for, or a bound on cost): a longer prompt is an error row or truncated, as on_too_long says."""
    param_columns: list[str] = field(default_factory=list)
    """Columns that override generation settings for their row (see PER_ROW_PARAMETERS); null cells keep the config."""
    on_duplicate_id: str = "report"
    """Rows repeating an earlier id: `report` (keep, count, warn), `error` (error rows), `ignore` (no check)."""
    limit: Optional[int] = None
    """Run on the first N rows only (files in name order), e.g. to try a large job's prompts and settings."""

    @property
    def chat(self) -> bool:
        """Whether prompts go through the tokenizer's chat template."""
        return bool(self.messages_column or self.system_prompt or self.apply_chat_template
                    or self.chat_template_kwargs or self.chat_template)

    @property
    def text_column(self) -> str:
        return self.messages_column or self.prompt_column

    def __post_init__(self) -> None:
        require(bool(self.path), "input.path must be set")
        require(not (self.messages_column and self.template),
                 "input.template fills plain prompts; it cannot be combined with input.messages_column")
        unknown = set(self.param_columns) - set(PER_ROW_PARAMETERS)
        require(not unknown, f"input.param_columns may only name {', '.join(PER_ROW_PARAMETERS)}; "
                              f"got {sorted(unknown)}")
        require(self.on_duplicate_id in ("report", "error", "ignore"),
                 f"input.on_duplicate_id must be 'report', 'error' or 'ignore', got {self.on_duplicate_id!r}")
        require(self.limit is None or self.limit >= 1, f"input.limit must be >= 1 or null, got {self.limit}")
        require(self.on_too_long in ("error", "truncate", "truncate_end"),
                 f"input.on_too_long must be 'error', 'truncate' or 'truncate_end', got {self.on_too_long!r}")
        require(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
                 f"input.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        require(not (self.pair_column and self.chat),
                 "input.pair_column pairs plain texts (as a cross-encoder reads them); it cannot be combined with a "
                 "chat template or input.messages_column")
        require(not (self.pair_column and self.on_too_long == "truncate"),
                 "input.on_too_long=truncate would cut a pair's first text (the query) from its start: use "
                 "truncate_end, which cuts the second text at its end, as rerankers are trained to read it")
        require(not (self.on_too_long == "truncate_end" and self.chat),
                 "input.on_too_long=truncate_end would cut off the end of a chat, the turn the model answers: "
                 "use truncate, which drops the oldest turns")
        if self.chat_template is not None and "{" not in self.chat_template:  # a template holds {{ or {%
            path = os.path.expanduser(self.chat_template)
            require(os.path.isfile(path), f"input.chat_template {self.chat_template} is neither a chat template "
                                           "(Jinja, with {{ ... }} or {% ... %}) nor a file")
            with open(path, encoding="utf-8") as f:
                self.chat_template = f.read()
