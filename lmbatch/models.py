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

import hashlib
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Optional
from lmbatch.storage import cache_dir

BUILTIN = "builtin://"
_VERSION = "v1"  # bump when the recipe changes, so cached copies are rebuilt

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
ARCHITECTURES = ("tiny-llama", "tiny-gpt2", "tiny-bert")
_LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what from_pretrained loads, under any file name


def tokenizer_source(path: str, revision: Optional[str], adapter: Optional[str]) -> tuple[str, Optional[str]]:
    """Where a job's tokenizer comes from, as (path, revision): the adapter's directory when it holds
    a tokenizer (a fine-tune that set a chat template or added tokens saves its own there, as TRL's
    trainers do), else the model's."""
    if adapter and os.path.isfile(os.path.join(adapter, "tokenizer_config.json")):
        return adapter, None
    return path, revision


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


def resolve_model_path(path: str) -> str:
    """A local directory or hub id passes through; `builtin://NAME` is built once and cached."""
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


def weight_files(root: Path) -> set[str]:
    """The weight files of a local model: those its shard indexes name, else the single file."""
    files = set()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (root / index).exists():
            files |= set(json.loads((root / index).read_text()).get("weight_map", {}).values())
    return files | {name for name in ("model.safetensors", "pytorch_model.bin") if (root / name).exists()}


def parameter_count(directory: str) -> Optional[int]:
    """Parameters of a local model, from its safetensors headers (None: weights in another format)."""
    files = weight_files(Path(directory))
    if not files or not all(name.endswith(".safetensors") for name in files):
        return None
    total = 0
    for name in files:
        with open(Path(directory) / name, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # the format: header length, JSON header, data
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def kv_cache_bytes_per_token(config, dtype: str) -> Optional[int]:
    """Bytes of KV cache one token of a sequence takes: layers x 2 (keys, values) x KV heads x head
    dim x bytes per value, from a model's (text) config; None where the config does not say. Models
    with sliding-window or compressed attention take less."""
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (getattr(config, "hidden_size", 0) // heads if heads else None)
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


IDENTITY_SAMPLES, IDENTITY_SAMPLE_BYTES = 16, 64 * 1024


def hub_commit(path: str, revision: Optional[str] = None) -> Optional[str]:
    """The commit of a hub model's files in the local cache (of `revision`, else of `main`); None
    where the cache does not hold them (a local directory, a model not fetched yet)."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json", revision=revision)  # cached by the plan's check
    return Path(cached).parent.name if isinstance(cached, str) else None


def model_identity(path: str, revision: Optional[str] = None) -> Optional[str]:
    """What the model at `path` is, to tell whether it changed between two runs of one job (a model
    directory updated in place, a symlink moved to a new model, a hub id with a new commit): a local
    directory by its content, a hub id by its commit in the local cache; None where neither is known.

    Content is every file's name and size, with 16 evenly spaced 64 KiB samples of it (all of a
    small file): at most 1 MiB read per file, even for weights of hundreds of GB, and any retrained
    or re-saved model differs in them. Copying the files, which changes their times, changes nothing.
    Hidden files are left out (`hf download --local-dir` keeps its download records in `.cache/`)."""
    local = Path(os.path.expanduser(resolve_model_path(path)))
    if not local.is_dir():
        commit = hub_commit(path, revision)
        return f"commit {commit}" if commit else None
    digest = hashlib.sha256()
    for file in sorted(p for p in local.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(local).parts)):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(local)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= IDENTITY_SAMPLES * IDENTITY_SAMPLE_BYTES:
                digest.update(f.read())
                continue
            for i in range(IDENTITY_SAMPLES):  # the first sample holds a safetensors file's header
                f.seek(i * (size - IDENTITY_SAMPLE_BYTES) // (IDENTITY_SAMPLES - 1))
                digest.update(f.read(IDENTITY_SAMPLE_BYTES))
    return f"content {digest.hexdigest()[:16]}"


def adapter_misfit(model_config, adapter: str, trust_remote_code: bool = False) -> Optional[str]:
    """How the PEFT adapter in `adapter` fails to fit the model of `model_config`, or None: layers it
    targets that the model lacks, or tensors of other shapes than the model's layers give them.
    Checked on an empty (meta-device) copy of the model and the adapter file's header: no weights read."""
    import warnings

    from accelerate import init_empty_weights
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():  # peft warns that the copy is not the base model its config names
        warnings.simplefilter("ignore")
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        try:
            expected = get_peft_model_state_dict(get_peft_model(empty, PeftConfig.from_pretrained(adapter)))
        except ValueError as e:  # peft's NoMatchingPeftModuleError: no layer of the model is a target
            return str(e).splitlines()[0]
    weights = Path(adapter, "adapter_model.safetensors")
    if not weights.exists():  # an older adapter_model.bin: no header to read without loading it
        return None
    with safe_open(str(weights), "pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    other = [name for name, shape in found.items() if name in expected and tuple(expected[name].shape) != shape]
    if not other:
        return None
    name = other[0]
    return (f"{len(other)} of its {len(found)} tensors have other shapes than the model's layers give them "
            f"({name}: {list(found[name])} in the adapter, {list(expected[name].shape)} for the model)")


def check_weights(directory: str) -> None:
    """Raise ValueError, naming the file, when a local model's weights cannot be loaded: none at all
    (a download or copy that stopped before them), a Git LFS pointer where the weights should be (a
    clone without `git lfs pull`), a truncated safetensors file (an interrupted copy), a shard its
    index names but that is missing. Replicas would otherwise fail loading them only after Ray and
    the job had started. Reads only file headers."""
    from safetensors import safe_open

    root = Path(directory)
    if not root.is_dir():
        raise ValueError("is a file, not a model directory (config.json, tokenizer and weights)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in root.iterdir()):
        raise ValueError(f"holds no weights (no {', '.join('*' + s for s in WEIGHT_SUFFIXES)} file): an "
                         "incomplete download or copy?")
    for name in sorted(weight_files(root)):
        path = root / name
        if not path.exists():
            raise ValueError(f"{name} is missing (its shard index names it)")
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise ValueError(f"{name} is a Git LFS pointer, not the weights: run `git lfs pull` in {root}")
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), "numpy"):
                    pass
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
                raise ValueError(f"{name} is not a readable safetensors file ({e}): an interrupted copy?") from None


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
                     max_positions: int = 2048):
    """Build a random-init model and its tokenizer with `save_pretrained` into `out_dir`.

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
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=max_positions, initializer_range=init_std, **ids)
    elif name == "tiny-gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=max_positions,
                            initializer_range=init_std, **ids)
    elif name == "tiny-bert":
        config = BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length, initializer_range=init_std, **ids)
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {ARCHITECTURES}")
    torch.manual_seed(seed)
    if reads_both_ways(config):  # an encoder has no LM head to generate with
        model = AutoModel.from_config(config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ARCHITECTURES:
        sys.exit(f"usage: python -m lmbatch.models {{{'|'.join(ARCHITECTURES)}}} OUT_DIR")
    print(build_tiny_model(sys.argv[2], sys.argv[1]))
