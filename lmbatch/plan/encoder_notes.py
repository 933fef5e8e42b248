"""Notes on a sentence-transformers model or cross-encoder: where its pipeline (pooling, normalizing, a
default prompt, the activation of its scores) differs from what the job computes, with the settings that
close the gap. Warnings, never errors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from lmbatch.config import JobConfig
from lmbatch.models.architecture import cross_encoder_function, score_function

ST_POOLINGS = {"cls": "cls", "cls_token": "cls", "mean": "mean", "mean_tokens": "mean", "lasttoken": "last"}
"""sentence-transformers' pooling modes (its `pooling_mode`, or a `pooling_mode_*` flag of older versions)
that generation.embedding has, by its name for them."""


def sentence_transformers_notes(job: JobConfig, path: str, revision: Optional[str],
                                context: Optional[int]) -> list[str]:
    """How a sentence-transformers model's own pipeline (its modules.json) embeds otherwise than the job: by
    another pooling (or one without its prompt's tokens), with a module lmbatch does not apply (a Dense
    projection), normalized or not unlike the job's vectors, after a default prompt the job's texts do not
    begin with, or cut shorter than the job's
    `context` or input.max_prompt_tokens (an older version's max_seq_length; newer ones save it as the
    tokenizer's, which an encoder's context is)."""
    modules = _model_json(path, "modules.json", revision) if job.generation.embedding else None
    if not isinstance(modules, list):
        return []
    notes, prompt = [], default_prompt(_model_json(path, "config_sentence_transformers.json", revision))
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = _model_json(path, f"{module.get('path')}/config.json", revision) or {}
            flags = [k.removeprefix("pooling_mode_") for k, on in config.items()
                     if k.startswith("pooling_mode_") and on is True]  # several at once are concatenated
            mode = config.get("pooling_mode") or "+".join(flags)
            ours = ST_POOLINGS.get(mode)
            if ours != job.generation.embedding:
                notes.append(f"pools by {mode} "
                             + (f"(generation.embedding={ours})" if ours else "(lmbatch has no such pooling)"))
            if config.get("include_prompt") is False and (prompt or job.input.template):
                notes.append("pools without the tokens of its prompt, which lmbatch pools with")
        elif kind not in ("Transformer", "Normalize"):
            notes.append(f"has a {kind} module, which lmbatch does not apply")
    normalizes = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    if normalizes != job.generation.embedding_normalize:
        notes.append(f"{'normalizes' if normalizes else 'does not normalize'} its vectors "
                     f"(generation.embedding_normalize={str(normalizes).lower()})")
    if prompt:
        name, text = prompt
        escaped = text.replace("{", "{{").replace("}", "}}")
        if not (job.input.template or "").startswith(escaped):
            notes.append(f"puts {json.dumps(text)} before every text (its default_prompt_name, {name}): "
                         f"'input.template=\"{escaped}{{{job.input.prompt_column}}}\"' does as it does")
    length = (_model_json(path, "sentence_bert_config.json", revision) or {}).get("max_seq_length")
    if isinstance(length, int) and length < min(job.input.max_prompt_tokens or math.inf, context or math.inf):
        notes.append(f"embeds at most {length} tokens (its max_seq_length: input.max_prompt_tokens={length} "
                     "input.on_too_long=truncate_end cuts as it does)")
    return notes


def cross_encoder_note(config) -> Optional[str]:
    """How a sentence-transformers cross-encoder's predict() scores otherwise than label_scores, where its config
    names another function for it (ms-marco-MiniLM's: the logits)."""
    ours, theirs = score_function(config), cross_encoder_function(config)
    if theirs in (None, ours):
        return None
    logits = " (the logits: ln(p / (1 - p)) of a label score p), which rank alike" if (
        theirs, ours) == ("identity", "sigmoid") else ""
    return (f"is a sentence-transformers cross-encoder whose predict() gives its scores through {theirs}{logits}; "
            f"label_scores go through {ours}, as transformers' text-classification pipeline gives them")


def default_prompt(config) -> Optional[tuple[str, str]]:
    """The prompt (its name and text) a sentence-transformers model's encode() puts before every text unless
    told otherwise: its config's default_prompt_name, where that names a prompt that is not empty."""
    if not isinstance(config, dict) or not isinstance(config.get("prompts"), dict):
        return None
    name = config.get("default_prompt_name")
    text = config["prompts"].get(name) if isinstance(name, str) else None
    return (name, text) if isinstance(text, str) and text else None


def _model_json(path: str, name: str, revision: Optional[str]):
    """A JSON file of a model directory or hub model; None where it has none (or it cannot be read)."""
    from transformers.utils import cached_file

    try:
        found = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        return json.loads(Path(found).read_text()) if found else None
    except Exception:  # noqa: BLE001 - a hub that cannot be reached, a file that is not JSON: no notes
        return None
