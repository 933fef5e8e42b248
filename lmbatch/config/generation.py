"""The `generation` group: what each row generates (conf/generation/); also the type of a row's settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from lmbatch.config.checks import ConfigError, require

PER_ROW_PARAMETERS = {"max_new_tokens": "integer", "max_length": "integer", "do_sample": "boolean",
                      "temperature": "number", "top_p": "number", "top_k": "integer", "min_p": "number",
                      "repetition_penalty": "number", "presence_penalty": "number", "frequency_penalty": "number",
                      "stop": "strings", "seed": "integer", "choices": "strings", "json_schema": "string",
                      "regex": "string", "adapter": "string"}
"""Generation settings a row may override through input.param_columns, and the kind of value each takes."""


EMBEDDING_POOLINGS = ("last", "mean", "cls")
"""How generation.embedding pools a prompt's last hidden states (`engine.pooling.embed_prompts`)."""


MAX_TOP_LOGPROBS = 20
"""The most alternatives per token generation.top_logprobs may ask for (OpenAI's and vLLM's default limit):
each is a struct in the output, per generated token."""


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
        require(self.max_new_tokens >= 1 or (self.max_new_tokens == 0 and (self.prompt_logprobs or self.embedding
                                                                              or self.classify)),
                 "generation.max_new_tokens must be >= 1 (or 0 with generation.prompt_logprobs, generation.embedding "
                 f"or generation.classify: score, embed or classify the prompts, generate nothing), got "
                 f"{self.max_new_tokens}")
        require(self.embedding in (None, *EMBEDDING_POOLINGS),
                 f"generation.embedding must be {', '.join(EMBEDDING_POOLINGS)} or null, got {self.embedding!r}")
        require(self.embedding_dimensions is None or self.embedding_dimensions >= 1,
                 f"generation.embedding_dimensions must be >= 1 or null, got {self.embedding_dimensions}")
        require(self.embedding or self.embedding_dimensions is None,
                 "generation.embedding_dimensions needs generation.embedding (last, mean or cls)")
        require(self.max_length is None or self.max_length >= 2,
                 f"generation.max_length must be >= 2 or null, got {self.max_length}")
        require(self.temperature >= 0 and math.isfinite(self.temperature),
                 f"generation.temperature must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, f"generation.top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= -1, f"generation.top_k must be >= 0 (or -1: disabled), got {self.top_k}")
        require(0 <= self.min_p <= 1, f"generation.min_p must be in [0, 1], got {self.min_p}")
        require(self.repetition_penalty > 0,
                 f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            require(-2 <= getattr(self, name) <= 2, f"generation.{name} must be in [-2, 2], got {getattr(self, name)}")
        require(all(isinstance(s, str) and s for s in self.stop),
                 "generation.stop must be a list of non-empty strings")
        require(all(isinstance(c, str) and c for c in self.choices),
                 "generation.choices must be a list of non-empty strings")
        if isinstance(self.json_schema, str):
            try:
                self.json_schema = json.loads(self.json_schema)
            except ValueError as e:
                raise ConfigError(f"generation.json_schema is not JSON: {e}") from None
        require(self.json_schema is None or isinstance(self.json_schema, dict),
                 f"generation.json_schema must be a mapping (a JSON object), got {self.json_schema!r}")
        require(self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
                 "generation.regex must be a non-empty string or null")
        held = [name for name in ("choices", "json_schema", "regex") if getattr(self, name) not in (None, [])]
        if len(held) > 1:
            raise ConfigError(f"generation.{held[0]} and generation.{held[1]} both say what a text may be: set one")
        require(0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
                 f"generation.top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        require(self.logprobs or not self.top_logprobs,
                 "generation.top_logprobs needs generation.logprobs=true (as in OpenAI's API)")
        require(self.num_return_sequences >= 1,
                 f"generation.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        require(self.num_return_sequences == 1 or self.do_sample,
                 "generation.num_return_sequences > 1 needs generation.do_sample=true "
                 "(greedy decoding would repeat the same text)")
