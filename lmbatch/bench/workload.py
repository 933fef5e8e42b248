"""The benchmark's workload (`benchmark`): a random-init model of a preset shape, saved and loaded
back through from_pretrained, and deterministic prompts of heavy-tailed lengths with per-row max_new_tokens."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmbatch.bench.benchmark import BenchmarkConfig


def build_model(preset: str, out_dir: Path, seed: int) -> str:
    """Random-init model of a preset shape, saved and later loaded through from_pretrained."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig, Qwen2Config

    from lmbatch.models import build_tiny_model, build_tokenizer, build_wordpiece_tokenizer, reads_both_ways

    builtin = {"tiny": "tiny-llama", "tiny_bert": "tiny-bert"}
    if preset in builtin:
        return str(build_tiny_model(out_dir, builtin[preset], seed=seed))
    tokenizer = build_wordpiece_tokenizer() if preset == "bert_small" else build_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    shapes = {
        # compute-heavy on a CPU yet quick enough to measure there
        "small": lambda: LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                                     initializer_range=0.2, **ids),
        "gpt2_small": lambda: GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=2048,
                                         initializer_range=0.2, **ids),
        "qwen2_5_0_5b": lambda: Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                            num_attention_heads=14, num_key_value_heads=2,
                                            max_position_embeddings=32768, tie_word_embeddings=True,
                                            initializer_range=0.2, **{**ids, "vocab_size": 151936}),
        # an encoder (it only embeds), all-MiniLM-L6-v2's shape
        "bert_small": lambda: BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                         num_attention_heads=12, max_position_embeddings=512, **ids),
    }
    if preset not in shapes:
        raise ValueError(f"unknown model_shape {preset!r}; choose tiny, tiny_bert or one of {sorted(shapes)}")
    torch.manual_seed(seed)
    config = shapes[preset]()
    model = (AutoModel if reads_both_ways(config) else AutoModelForCausalLM).from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def build_workload(cfg: BenchmarkConfig, tokenizer) -> tuple[list[str], list[list[int]], list[int]]:
    """(texts, their token ids, per-row max_new_tokens), deterministic for the seed."""
    rng = random.Random(cfg.seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    heading = random.Random(cfg.seed + 1)  # its own stream: the rows are the same with a prefix or without
    templates = [tokenizer.decode([heading.choice(vocab) for _ in range(cfg.shared_prefix_tokens)])
                 for _ in range(cfg.templates)]
    texts, ids, new = [], [], []
    budget = cfg.max_prompt_tokens - tokenizer.num_special_tokens_to_add()
    for row in range(cfg.num_prompts):
        instructions = templates[row % cfg.templates]
        n = int(rng.lognormvariate(math.log(cfg.median_prompt_tokens), 1.0))
        n = min(cfg.max_prompt_tokens, max(cfg.min_prompt_tokens, n))
        text = tokenizer.decode([rng.choice(vocab) for _ in range(n)])
        # the special tokens the tokenizer adds to a text ([CLS] and [SEP]) count in its length
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"][: budget]
        texts.append(instructions + tokenizer.decode(encoded))
        ids.append(tokenizer(texts[-1])["input_ids"])
        new.append(rng.randint(cfg.min_new_tokens, cfg.max_new_tokens))
    return texts, ids, new
