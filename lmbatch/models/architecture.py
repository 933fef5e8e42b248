"""Facts read from a model's config: what kind of model it is (a decoder, an encoder, a classifier),
which tokens end its rows, what a token of its KV cache costs, and which of its generation settings shape text.
"""

from __future__ import annotations

from typing import Optional

from lmbatch.models.builtin import resolve_model_path


def ending_ids(generation_eos, tokenizer) -> set[int]:
    """The tokens that end a row: any EOS of the model's generation config, and the tokenizer's (as in
    vLLM): where the config leaves out the token the tokenizer ends a text or a chat turn with,
    model.generate alone runs on past the answer to max_new_tokens."""
    listed = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    return {*listed, tokenizer.eos_token_id} - {None}


def reads_both_ways(config) -> bool:
    """Whether a model is an encoder (BERT and its kin, as most sentence-transformers models are), whose
    tokens each see those after them too: it embeds text but cannot generate it. Known by transformers
    holding a masked-LM model of its architecture, unless it is an encoder-decoder or set up as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_encoder_decoder
            and not getattr(config, "is_decoder", False))


def is_classifier(config) -> bool:
    """Whether a checkpoint is a sequence classifier (a `*ForSequenceClassification`: BERT fine-tuned to
    label texts, a reward model), whose head gives labels' scores and no tokens to generate with."""
    return any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])


def score_function(config) -> str:
    """What transformers' text-classification pipeline applies to a classifier's logits by default, and so
    what label_scores are: `identity` for a regression head, `sigmoid` for a multi-label head or one of a
    single output (a reranker's relevance), else `softmax` over the labels."""
    if config.problem_type == "regression":
        return "identity"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def cross_encoder_function(config) -> Optional[str]:
    """What a sentence-transformers cross-encoder's predict() applies to its logits, where its config names it
    (`sentence_transformers.activation_fn` from version 4, `sbert_ce_default_activation_function` before):
    `identity` for the raw logits (ms-marco-MiniLM's), `sigmoid`, ... None where the config names none."""
    saved = getattr(config, "sentence_transformers", None)
    named = ((saved.get("activation_fn") if isinstance(saved, dict) else None)
             or getattr(config, "sbert_ce_default_activation_function", None))
    return named.rsplit(".", 1)[-1].lower() if isinstance(named, str) else None


def head_size(config) -> Optional[int]:
    """Dimensions of each attention head, from a model's (text) config; None where the config does not say."""
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)


def kv_cache_bytes_per_token(config, dtype: str) -> Optional[int]:
    """Bytes of KV cache one token of a sequence takes: layers x 2 (keys, values) x KV heads x head
    dim x bytes per value, from a model's (text) config; None where the config does not say. Models
    with sliding-window or compressed attention take less."""
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    head_dim = head_size(config)
    layers = getattr(config, "num_hidden_layers", None)
    if not (layers and kv_heads and head_dim):
        return None
    return layers * 2 * kv_heads * head_dim * (4 if dtype == "float32" else 2)


SPECIAL_TOKEN_SETTINGS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


# Settings that shape how generate() reports, not what it generates; and the KV cache, which
# model.kv_cache chooses (transformers itself drops the "hybrid" some models ship).
_NOT_SHAPING_TEXT = {"use_cache", "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                     "return_dict_in_generate", "cache_implementation", "transformers_version"}


def special_tokens_only(generation_config):
    """A model's generation config reduced to its special tokens. `generate` fills every setting a
    call leaves unset from the model's generation_config.json: a beam count, a ban on repeated
    n-grams, a minimum length, a repetition penalty. The engine installs this instead, so that the
    job's generation.* settings, saved in the manifest, are all that shape the output."""
    from transformers import GenerationConfig

    return GenerationConfig(**{k: v for k in SPECIAL_TOKEN_SETTINGS
                               if (v := getattr(generation_config, k, None)) is not None})


def load_generation_config(path: str, revision: Optional[str] = None):
    """The model's generation config; a default one where it ships none."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(resolve_model_path(path), revision=revision)
    except OSError:
        return GenerationConfig()


def settings_not_applied(generation_config) -> dict:
    """What a model's generation_config.json sets that lmbatch does not apply (see `special_tokens_only`)."""
    from transformers import GenerationConfig

    # transformers 5 leaves unset settings None and keeps their effective defaults apart; 4.x has them in place
    defaults = getattr(GenerationConfig(), "_get_default_generation_params", dict)()
    return {k: v for k, v in generation_config.to_diff_dict().items()
            if not k.startswith("_") and k not in SPECIAL_TOKEN_SETTINGS and k not in _NOT_SHAPING_TEXT
            and v is not None and v != defaults.get(k)}
