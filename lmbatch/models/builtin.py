"""Built-in tiny models that work offline, and resolving `model.path`.

`builtin://tiny-llama` (rotary positions) and `builtin://tiny-gpt2` (learned absolute positions)
are random-init models built deterministically from a config plus a byte-level BPE tokenizer
trained on a fixed corpus; `builtin://tiny-bert` is an encoder (it reads both ways, so it only
embeds) with a WordPiece tokenizer, as BERT-style sentence-transformers models are. Each is saved
with `save_pretrained` into a cache directory on first use, and then loaded like any other model
through `from_pretrained`. They produce nonsense, quickly: they exist so that the whole job runs,
and is tested, without a download.

    python -m lmbatch.models tiny-gpt2 /tmp/tiny-gpt2    # write one to a directory of your choice
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lmbatch.models.remote import is_remote, local_copy
from lmbatch.storage import cache_dir

BUILTIN = "builtin://"
_VERSION = "v1"  # bump when the recipe changes, so cached copies are rebuilt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
ARCHITECTURES = ("tiny-llama", "tiny-gpt2", "tiny-bert")


def resolve_model_path(path: str) -> str:
    """A local directory or hub id passes through; `builtin://NAME` is built once and cached; a model in a
    bucket (s3://...) gives a local copy of its files but the weights (`remote`: the plan and the
    tokenizer read those; a replica copies the whole model)."""
    if is_remote(path):
        return local_copy(path, weights=False)
    if not path.startswith(BUILTIN):
        return path
    name = path[len(BUILTIN):]
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown built-in model {path!r}; choose one of "
                         + ", ".join(BUILTIN + a for a in ARCHITECTURES))
    target = cache_dir() / "models" / f"{name}-{_VERSION}"
    if not (target / "config.json").exists():
        _build_atomically(target, name)
    return str(target)


def _build_atomically(target: Path, name: str) -> None:
    # Parallel jobs may race to build the same model: each builds privately, one rename wins.
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_model(scratch, name)
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _corpus() -> list[str]:
    from lmbatch.input.builtin import sample_sentences

    return sample_sentences()


def build_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )


def build_wordpiece_tokenizer(max_length: int = 512):
    """A BERT-style WordPiece tokenizer: lower-cased, each text read as `[CLS] text [SEP]` and a pair as
    `[CLS] first [SEP] second [SEP]`, the second text and its [SEP] of token type 1. Its vocabulary is
    set, not trained (the WordPiece trainer breaks ties differently from run to run): the sample corpus's
    words, and printable ASCII characters alone and as word pieces, which spell any other word."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from lmbatch.input.builtin import WORDS

    chars = [chr(c) for c in range(33, 127)]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = [*specials, *chars, *(f"##{c}" for c in chars), *sorted(set(WORDS) - set(chars))]  # "a" is both
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])  # BERT's


def build_tiny_model(out_dir, name: str = "tiny-llama", *, seed: int = 0, init_std: float = 0.2,
                     max_positions: int = 2048, heads: int = 4):
    """Build a random-init model and its tokenizer with `save_pretrained` into `out_dir`; `heads` attention
    heads share its 64 dimensions (2: heads of 32, the smallest vLLM's CPU attention runs).

    init_std is well above the usual 0.02 on purpose: near-flat logits let float rounding flip
    an argmax between padded and unpadded runs, and the tests compare greedy outputs exactly.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, GPT2Config, LlamaConfig

    if name == "tiny-bert":
        tokenizer = build_wordpiece_tokenizer(max_length=min(max_positions, 512))
    else:
        tokenizer = build_tokenizer()
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if name == "tiny-llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=heads, num_key_value_heads=min(2, heads),
                             max_position_embeddings=max_positions, initializer_range=init_std, **ids)
    elif name == "tiny-gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=heads, n_positions=max_positions,
                            initializer_range=init_std, **ids)
    elif name == "tiny-bert":
        config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length, initializer_range=init_std, **ids)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    if name == "tiny-bert":  # an encoder has no LM head to generate with
        model = AutoModel.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
