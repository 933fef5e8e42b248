"""The typed schema of every config group.

The YAML files under conf/ are the user-facing surface; these dataclasses are registered in
Hydra's ConfigStore so that a wrong type or an unknown key fails when the config is composed,
and each `__post_init__` checks values when `OmegaConf.to_object` builds the job config.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Optional, Sequence

from hydra.core.config_store import ConfigStore

from lmbatch.batching import plan_micro_batches


class ConfigError(ValueError):
    """A config value is invalid; the message says which key and why."""


PER_ROW_PARAMETERS = {"max_new_tokens": "integer", "max_length": "integer", "do_sample": "boolean",
                      "temperature": "number", "top_p": "number", "top_k": "integer", "min_p": "number",
                      "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
                      "stop": "strings", "seed": "integer", "choices": "strings", "json_schema": "string",
                      "regex": "string", "adapter": "string"}
"""Generation settings a row may override through input.param_columns, and the kind of value each takes."""
EMBEDDING_POOLINGS = ("last", "mean", "cls")
"""How generation.embedding pools a prompt's last hidden states (`embedding.embed_prompts`)."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token generation.top_logprobs may ask for (OpenAI's and vLLM's default limit):
each is a struct in the output, per generated token."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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
        _require(bool(self.path), "input.path must be set")
        _require(not (self.messages_column and self.template),
                 "input.template fills plain prompts; it cannot be combined with input.messages_column")
        unknown = set(self.param_columns) - set(PER_ROW_PARAMETERS)
        _require(not unknown, f"input.param_columns may only name {', '.join(PER_ROW_PARAMETERS)}; "
                              f"got {sorted(unknown)}")
        _require(self.on_duplicate_id in ("report", "error", "ignore"),
                 f"input.on_duplicate_id must be 'report', 'error' or 'ignore', got {self.on_duplicate_id!r}")
        _require(self.limit is None or self.limit >= 1, f"input.limit must be >= 1 or null, got {self.limit}")
        _require(self.on_too_long in ("error", "truncate", "truncate_end"),
                 f"input.on_too_long must be 'error', 'truncate' or 'truncate_end', got {self.on_too_long!r}")
        _require(self.max_prompt_tokens is None or self.max_prompt_tokens >= 1,
                 f"input.max_prompt_tokens must be >= 1 or null, got {self.max_prompt_tokens}")
        _require(not (self.pair_column and self.chat),
                 "input.pair_column pairs plain texts (as a cross-encoder reads them); it cannot be combined with a "
                 "chat template or input.messages_column")
        _require(not (self.pair_column and self.on_too_long == "truncate"),
                 "input.on_too_long=truncate would cut a pair's first text (the query) from its start: use "
                 "truncate_end, which cuts the second text at its end, as rerankers are trained to read it")
        _require(not (self.on_too_long == "truncate_end" and self.chat),
                 "input.on_too_long=truncate_end would cut off the end of a chat, the turn the model answers: "
                 "use truncate, which drops the oldest turns")
        if self.chat_template is not None and "{" not in self.chat_template:  # a template holds {{ or {%
            path = os.path.expanduser(self.chat_template)
            _require(os.path.isfile(path), f"input.chat_template {self.chat_template} is neither a chat template "
                                           "(Jinja, with {{ ... }} or {% ... %}) nor a file")
            with open(path, encoding="utf-8") as f:
                self.chat_template = f.read()


PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")


@dataclass
class OutputConfig:
    path: str = "${hydra:runtime.output_dir}/output"
    """Directory (or URI) that receives the Parquet parts, `_manifest.json`, `_metrics.json`, `_SUCCESS`."""
    mode: str = "resume"
    """`resume`: continue this job's partial output (a finished one is a no-op); `overwrite`: start afresh;
    `retry_errors`: resume, and generate again the chunks holding rows that failed in generation (out of
    memory, a crash, the model raising), not for their input, as a larger GPU or a fix may make them pass."""
    max_rows_per_file: Optional[int] = None
    """Cap on rows per output part (each chunk is one part, so this caps batching.chunk_rows too)."""
    partition_by: Optional[str] = None
    """Input column to partition the output by, Hive style: `COLUMN=value/part-*.parquet`."""
    compression: str = "snappy"
    """Parquet codec of the parts: `snappy` (read everywhere), `zstd` (smaller), `gzip`, `lz4`, `brotli`, `none`."""
    reasoning_tags: list[str] = field(default_factory=list)
    """The tags around a reasoning model's thinking, e.g. `["<think>", "</think>"]` (Qwen3, DeepSeek-R1,
    QwQ): the text before the closing tag goes to a `reasoning` column and `generated_text` holds the
    answer after it. []: the text as generated."""
    max_error_fraction: Optional[float] = None
    """The share of error rows a job may have: more, and it stops once 1,000 rows are done in a run (a
    template naming the wrong column, a model failing every row), or, for a smaller job, ends without
    `_SUCCESS`, exit status 1 either way. 0: any error row fails the job; null: never (the default)."""
    parse_json: bool = False
    """Add a `generated_json` column: each text parsed as JSON, typed by generation.json_schema (an object
    a struct of its properties, an array a list, ...), so the answers' fields are columns to query; null
    for a text that is not a value the schema accepts whole (one cut at the token limit)."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "output.path must be set")
        _require(not self.reasoning_tags or (len(self.reasoning_tags) == 2 and all(self.reasoning_tags)),
                 f"output.reasoning_tags must be [] or an opening and a closing tag, got {self.reasoning_tags}")
        _require(self.max_error_fraction is None or 0 <= self.max_error_fraction <= 1,
                 f"output.max_error_fraction must be between 0 and 1 or null, got {self.max_error_fraction}")
        _require(self.compression in PARQUET_CODECS,
                 f"output.compression must be one of {', '.join(PARQUET_CODECS)}, got {self.compression!r}")
        _require(self.max_rows_per_file is None or self.max_rows_per_file >= 1,
                 f"output.max_rows_per_file must be >= 1 or null, got {self.max_rows_per_file}")
        _require(self.mode in ("resume", "overwrite", "retry_errors"),
                 f"output.mode must be 'resume', 'overwrite' or 'retry_errors', got {self.mode!r}")

    def too_many_errors(self, rows: int, errors: int) -> bool:
        return self.max_error_fraction is not None and errors > self.max_error_fraction * rows


@dataclass
class ModelConfig:
    path: str = "builtin://tiny-llama"
    """Hugging Face hub id or local directory; `builtin://tiny-llama` / `tiny-gpt2` / `tiny-bert` build offline."""
    dtype: str = "auto"
    """`auto` (float32 on CPU, bfloat16 on GPU), `float32`, `bfloat16` or `float16`."""
    device_map: Optional[str] = None
    """Passed to from_pretrained; `auto` spreads one replica over its `cluster.gpus_per_replica` GPUs."""
    attn_implementation: Optional[str] = None
    """Attention kernel (`sdpa`, `flash_attention_2`, `eager`); null: FlashAttention-2 on GPU when the
    flash_attn package is installed and the model supports it, else transformers' choice (SDPA where the
    model supports it)."""
    kv_cache: Optional[str] = None
    """`static` (allocated once per micro-batch) or `dynamic` (grows every decode step); null: static
    on GPU, where growing the cache cost 1.4-5x more per decode step on an H200, dynamic on CPU."""
    trust_remote_code: bool = False
    """Allow model repositories that ship their own code."""
    revision: Optional[str] = None
    """A hub model's branch, tag or commit; null: where `main` points when the job is planned. Either
    way the plan pins the commit, and every replica and tokenizer loads that one (each node of a
    cluster downloads a hub model itself): a job never mixes two commits of a model."""
    adapter: Optional[str] = None
    """A PEFT adapter (LoRA and kin) fine-tuned from this model: a local directory with its
    `adapter_config.json` and weights, as peft's `save_pretrained` writes it. Each replica merges it
    into the weights as it loads them, so it costs nothing per token; a tokenizer saved with it (a
    fine-tune's own chat template) is used instead of the model's. Needs `pip install peft`."""
    adapters: dict[str, str] = field(default_factory=dict)
    """Several PEFT adapters of this model by name (`{support: /adapters/support, ...}`), each replica
    holding them all beside the weights, unmerged; generation.adapter (per row: an `adapter` column)
    picks the one that generates a row, null the model alone. They share the model's tokenizer."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path must be set")
        _require(not (self.adapter and self.adapters), "model.adapter and model.adapters: set one (one of "
                 "model.adapters can generate every row, with generation.adapter)")
        _require(all(isinstance(name, str) and name and path for name, path in self.adapters.items()),
                 "model.adapters must map names to adapter directories")
        _require(self.dtype in ("auto", "float32", "bfloat16", "float16"),
                 f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _require(self.kv_cache in (None, "static", "dynamic"),
                 f"model.kv_cache must be static, dynamic or null, got {self.kv_cache!r}")


@dataclass
class GenerationOptions:
    max_new_tokens: int = 32
    """Upper bound on generated tokens per row; 0, with prompt_logprobs, embedding or classify, generates
    nothing: the prompts are only scored, embedded or classified."""
    max_length: Optional[int] = None
    """Optional cap on prompt + generated tokens (the classic `max_length`); the tighter bound wins."""
    do_sample: bool = False
    """Sample (true) or decode greedily (false)."""
    temperature: float = 1.0
    """Softmax temperature when sampling; 0 decodes greedily (as OpenAI's API and vLLM read it)."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    top_k: int = 50
    """Sample among the k most likely tokens; 0 (or -1, as vLLM writes it) disables it."""
    min_p: float = 0.0
    """Sample among the tokens at least min_p times as likely as the likeliest (after temperature, top-k
    and top-p, as transformers and vLLM apply it); 0 disables it."""
    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeated tokens; 1 disables it."""
    presence_penalty: float = 0.0
    """OpenAI's and vLLM's: subtracted, in [-2, 2], from the score of every token the row has already
    generated (its prompt's do not count); > 0 discourages repeats (Qwen3 suggests up to 1.5 against
    endless repetitions). 0 disables it."""
    frequency_penalty: float = 0.0
    """OpenAI's and vLLM's: in [-2, 2], times how often the row has already generated a token,
    subtracted from that token's score. 0 disables it."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation of a row ends at the first one, which is cut from the text. One that spells
    a special token (texts never show those: "<|im_end|>") ends it where the model generates that token."""
    seed: int = 0
    """Seed for sampling; the same seed, config and input give the same output on a rerun."""
    num_return_sequences: int = 1
    """Samples per prompt; above 1 each sample is its own output row with `sample_index`."""
    choices: list[str] = field(default_factory=list)
    """The texts a row may answer with (labels, for classification): decoding keeps, step by step,
    only the tokens that continue one of them, so the text is exactly one. Such a row generates as
    many tokens as its longest choice needs (max_new_tokens does not apply). Empty: free text."""
    json_schema: Any = None
    """A JSON schema (a mapping, or a string of JSON) every text is held to: decoding keeps, step by
    step, only the tokens that continue a text the schema accepts, then ends the row with an EOS
    (structured output, as vLLM's guided decoding; needs outlines-core). Null: free text."""
    regex: Optional[str] = None
    """A regular expression every text is held to, as json_schema is (the whole text matches it)."""
    adapter: Optional[str] = None
    """The adapter (a name in model.adapters) that generates the rows; null: the model alone (a row's
    `adapter` cell of "" too, whatever this says)."""
    json_whitespace: Optional[str] = None
    """A regular expression for the whitespace a json_schema's text may hold between its tokens. Null:
    outlines-core's, a single optional space; "" for none (compact JSON, fewest tokens); or e.g.
    "[\\n ]{0,16}" for the line breaks and indentation a model may be used to writing JSON with."""
    logprobs: bool = False
    """Add a `logprob` column: the log-probability the model gives each row's generated tokens (those
    `num_generated_tokens` counts, less an EOS that ends the row) given its prompt, from its own logits
    (before repetition penalty, temperature, top-k/top-p or choices). Rows with choices also get
    `choice_logprobs`: each choice's log-probability given the prompt (free for choices of one token
    each; longer ones cost one more forward pass over the prompt)."""
    top_logprobs: int = 0
    """With logprobs, add a `token_logprobs` column: each counted token's id, text and log-probability,
    with the `top_logprobs` likeliest tokens at its step and theirs (OpenAI's and vLLM's top_logprobs,
    for token-level confidence or a teacher's distributions to distill from). 0: none; at most 20."""
    prompt_logprobs: bool = False
    """Add a `prompt_logprob` column: the log-probability the model gives each row's prompt, every token
    given those before it (the first, which has none, left out), as vLLM's prompt_logprobs summed; the
    prompt's perplexity is exp(-prompt_logprob / (num_prompt_tokens - 1)). Costs a forward pass over the
    prompts (a second prefill)."""
    embedding: Optional[str] = None
    """Add an `embedding` column: each row's prompt as a vector, from the model's last hidden states over it,
    pooled: `last` (the last token's: what decoder embedding models such as Qwen3-Embedding, gte-Qwen2 and
    e5-mistral are trained for), `mean` (over the prompt's tokens: all-MiniLM, e5) or `cls` (the first
    token's, for encoders such as BGE and GTE, whose first token sees the whole text). Costs a forward pass
    over the prompts; with max_new_tokens=0, that pass is all the job computes (an encoder, which reads text
    both ways, does only that). Null: none."""
    embedding_dimensions: Optional[int] = None
    """With embedding: keep the first N dimensions (a Matryoshka model's shorter vectors, as OpenAI's
    `dimensions`), before normalizing. Null: all (the model's hidden size)."""
    embedding_normalize: bool = True
    """With embedding: scale each vector to length 1 (so a dot product is the cosine similarity, as
    embedding models are used); false keeps the pooled hidden state as it is."""
    classify: bool = False
    """Classify each prompt with the model's sequence-classification head (a fine-tuned classifier: a
    `*ForSequenceClassification`, such as a toxicity, quality or language classifier, or a reward model):
    add a `label` column (the likeliest label's name) and a `label_scores` column (every label's score, as
    transformers' text-classification pipeline gives them). Such a model generates nothing
    (max_new_tokens=0)."""

    def __post_init__(self) -> None:
        _require(self.max_new_tokens >= 1 or (self.max_new_tokens == 0 and (self.prompt_logprobs or self.embedding
                                                                              or self.classify)),
                 "generation.max_new_tokens must be >= 1 (or 0 with generation.prompt_logprobs, generation.embedding "
                 f"or generation.classify: score, embed or classify the prompts, generate nothing), got "
                 f"{self.max_new_tokens}")
        _require(self.embedding in (None, *EMBEDDING_POOLINGS),
                 f"generation.embedding must be {', '.join(EMBEDDING_POOLINGS)} or null, got {self.embedding!r}")
        _require(self.embedding_dimensions is None or self.embedding_dimensions >= 1,
                 f"generation.embedding_dimensions must be >= 1 or null, got {self.embedding_dimensions}")
        _require(self.embedding or self.embedding_dimensions is None,
                 "generation.embedding_dimensions needs generation.embedding (last, mean or cls)")
        _require(self.max_length is None or self.max_length >= 2,
                 f"generation.max_length must be >= 2 or null, got {self.max_length}")
        _require(self.temperature >= 0 and math.isfinite(self.temperature),
                 f"generation.temperature must be >= 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, f"generation.top_p must be in (0, 1], got {self.top_p}")
        _require(self.top_k >= -1, f"generation.top_k must be >= 0 (or -1: disabled), got {self.top_k}")
        _require(0 <= self.min_p <= 1, f"generation.min_p must be in [0, 1], got {self.min_p}")
        _require(self.repetition_penalty > 0,
                 f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            _require(-2 <= getattr(self, name) <= 2, f"generation.{name} must be in [-2, 2], got {getattr(self, name)}")
        _require(all(isinstance(s, str) and s for s in self.stop),
                 "generation.stop must be a list of non-empty strings")
        _require(all(isinstance(c, str) and c for c in self.choices),
                 "generation.choices must be a list of non-empty strings")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError as e:
                raise ConfigError(f"generation.json_schema is not JSON: {e}") from None
        _require(self.json_schema is None or isinstance(self.json_schema, dict),
                 f"generation.json_schema must be a mapping (a JSON object), got {self.json_schema!r}")
        _require(self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
                 "generation.regex must be a non-empty string or null")
        held = [name for name in ("choices", "json_schema", "regex") if getattr(self, name) not in (None, [])]
        if len(held) > 1:
            raise ConfigError(f"generation.{held[0]} and generation.{held[1]} both say what a text may be: set one")
        _require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                 f"generation.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        _require(self.logprobs or not self.top_logprobs,
                 "generation.top_logprobs needs generation.logprobs=true (as in OpenAI's API)")
        _require(self.num_return_sequences >= 1,
                 f"generation.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        _require(self.num_return_sequences == 1 or self.do_sample,
                 "generation.num_return_sequences > 1 needs generation.do_sample=true "
                 "(greedy decoding would repeat the same text)")


@dataclass
class BatchingConfig:
    strategy: str = "bucketed"
    """`bucketed`: order a window by length and cut token-budget micro-batches; `fixed`: input order, fixed size."""
    max_batch_tokens: int = 16384
    """Budget for one micro-batch: sequences x (longest prompt + max_new_tokens), padding included; a
    row sampled generation.num_return_sequences times is that many sequences."""
    max_batch_rows: int = 64
    """Cap on the sequences of one bucketed micro-batch (rows, unless num_return_sequences > 1)."""
    min_padding_efficiency: float = 0.8
    """A bucketed micro-batch closes before real / padded prompt tokens would drop below this."""
    min_decode_efficiency: float = 0.8
    """...or before sum(max_new_tokens) / (rows x largest max_new_tokens) would drop below this."""
    fixed_batch_size: int = 16
    """Rows per micro-batch with strategy=fixed."""
    share_prefix: bool = True
    """Compute the tokens all prompts of a micro-batch begin with (a template's instructions, a system
    prompt; 16 or more) once, for all its rows, into either kind of KV cache (model.kv_cache)."""
    group_prefixes: bool = True
    """With share_prefix and strategy=bucketed: bucket the rows of each template of a job that mixes them
    apart, so that their micro-batches share it (`interface.prefix_groups`). False: order by length
    alone, in fewer micro-batches (on a GPU, where a job's time goes by decode steps, fewer of them)."""
    chunk_rows: int = 4096
    """Rows in one unit of work: read, bucketed, generated and committed as one output file together,
    so also the window the planner buckets (larger: wider micro-batches, fewer decode steps).
    Small inputs are cut finer so that every replica gets two chunks."""

    def __post_init__(self) -> None:
        _require(self.strategy in ("bucketed", "fixed"),
                 f"batching.strategy must be 'bucketed' or 'fixed', got {self.strategy!r}")
        for key in ("max_batch_tokens", "max_batch_rows", "fixed_batch_size", "chunk_rows"):
            _require(getattr(self, key) >= 1, f"batching.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("min_padding_efficiency", "min_decode_efficiency"):
            _require(0 <= getattr(self, key) <= 1, f"batching.{key} must be in [0, 1], got {getattr(self, key)}")

    def plan(self, prompt_lengths: Sequence[int], max_new_tokens: Sequence[int],
             group_keys: Optional[Sequence[Hashable]] = None,
             sequences: Optional[Sequence[int]] = None) -> list[list[int]]:
        """The planner's micro-batches (row indices) with these settings."""
        return plan_micro_batches(
            prompt_lengths, max_new_tokens, strategy=self.strategy, max_batch_tokens=self.max_batch_tokens,
            max_batch_rows=self.max_batch_rows, fixed_batch_size=self.fixed_batch_size,
            min_padding_efficiency=self.min_padding_efficiency, min_decode_efficiency=self.min_decode_efficiency,
            group_keys=group_keys, sequences=sequences)


@dataclass
class ClusterConfig:
    address: Optional[str] = None
    """Ray cluster to attach to; null uses RAY_ADDRESS when set, else starts a local Ray."""
    num_replicas: int = 2
    """Model replicas (Ray actors), each holding one copy of the model."""
    gpus_per_replica: float = 0
    """GPUs reserved per replica; 0 runs on CPU."""
    cpus_per_replica: float = 0.5
    """CPUs reserved per replica. Leave room for Ray's readers: a pool holding every CPU deadlocks."""
    torch_threads: Optional[int] = None
    """Torch intra-op threads per replica; null means max(1, round(cpus_per_replica))."""
    prepare_cpus: float = 0.25
    """CPUs reserved by each read+prepare task (at most num_replicas of them run at once)."""
    stall_timeout_s: Optional[float] = 1800
    """A replica whose generation makes no progress (no micro-batch done, or a chunk's part not
    written) for this long ends its process, printing every thread's stack: a hung GPU kernel, a
    deadlock in native code or a write to a hung mount would otherwise stall the job forever. Ray
    restarts it and retries the chunk; a chunk that stalls again is generated a row at a time, so
    the row that hangs becomes an error row. A chunk's input not read (and prepared) in this long, as
    from a hung mount, stops the job naming its files. Set it well above the slowest micro-batch;
    null: never."""
    load_timeout_s: Optional[float] = 3600
    """A replica whose start (its check that it sees the output, then the model load from disk,
    network storage or the hub) has not finished after this long ends its process, printing every
    thread's stack, as a stalled one does: a hung mount or download would otherwise keep the job at
    `replicas starting` forever. Ray starts it again; a replica whose loads die or hang twice in a
    row, while none has the model loaded, stops the job. Set it well above the slowest load (a
    140 GB model at 200 MB/s takes 12 minutes); null: never."""

    def __post_init__(self) -> None:
        _require(self.num_replicas >= 1, f"cluster.num_replicas must be >= 1, got {self.num_replicas}")
        _require(self.gpus_per_replica >= 0, f"cluster.gpus_per_replica must be >= 0, got {self.gpus_per_replica}")
        _require(self.cpus_per_replica > 0, f"cluster.cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        _require(self.prepare_cpus > 0, f"cluster.prepare_cpus must be > 0, got {self.prepare_cpus}")
        _require(self.stall_timeout_s is None or self.stall_timeout_s > 0,
                 f"cluster.stall_timeout_s must be > 0 or null, got {self.stall_timeout_s}")
        _require(self.load_timeout_s is None or self.load_timeout_s > 0,
                 f"cluster.load_timeout_s must be > 0 or null, got {self.load_timeout_s}")
        _require(self.torch_threads is None or self.torch_threads >= 1,
                 f"cluster.torch_threads must be >= 1 or null, got {self.torch_threads}")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, round(self.cpus_per_replica))


@dataclass
class JobConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine: str = "hf"
    """`hf`: transformers generate; `echo`: no model, a fixed text (measures the pipeline alone)."""
    dry_run: bool = False
    """Validate input and config, print the token-length histogram and the plan; generate nothing."""
    progress_every_s: float = 5.0
    """Seconds between progress lines (raise it for the logs of long scheduled jobs)."""

    @property
    def replica_dtype(self) -> str:
        """The dtype replicas hold the model in: model.dtype, `auto` being bfloat16 on GPU, float32 on CPU."""
        if self.model.dtype != "auto":
            return self.model.dtype
        return "bfloat16" if self.cluster.gpus_per_replica else "float32"

    @property
    def held_to_pattern(self) -> bool:
        """Whether texts (the job's, or some rows') are held to a JSON schema or a regular expression."""
        g = self.generation
        return g.json_schema is not None or g.regex is not None or bool(
            {"json_schema", "regex"} & set(self.input.param_columns))

    def __post_init__(self) -> None:
        _require(self.engine in ("hf", "echo"), f"engine must be 'hf' or 'echo', got {self.engine!r}")
        adapters = self.model.adapters
        _require(self.generation.adapter is None or self.generation.adapter in adapters,
                 f"generation.adapter={self.generation.adapter} is not one of model.adapters"
                 f"{' (' + ', '.join(adapters) + ')' if adapters else ', which names none'}")
        _require(bool(adapters) or "adapter" not in self.input.param_columns,
                 "input.param_columns names adapter, but model.adapters names none for it to choose from")
        _require(self.progress_every_s > 0, f"progress_every_s must be > 0, got {self.progress_every_s}")
        if self.output.parse_json:
            _require(self.generation.json_schema is not None, "output.parse_json needs generation.json_schema: the "
                                                              "generated_json column is typed by the job's schema")
            try:
                self.generated_json_type
            except ValueError as e:
                raise ConfigError(f"output.parse_json cannot type the generated_json column: {e}") from None

    @property
    def generated_json_type(self):
        """The Arrow type of the generated_json column (output.parse_json)."""
        from lmbatch.structured import arrow_type

        return arrow_type(self.generation.json_schema)


def register_configs() -> None:
    """Register the schema so `defaults: [generate_schema, ...]` type-checks every key."""
    ConfigStore.instance().store(name="generate_schema", node=JobConfig)


register_configs()
