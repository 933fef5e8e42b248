"""Shared fixtures: tiny models built locally, Parquet inputs, composed configs, a loopback Ray.

Nothing here downloads: models are random-init from a config, saved with save_pretrained and
loaded back through from_pretrained, exactly like a user's local model directory.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Workers inherit the environment of the Ray that the tests start, so set it before any init.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray rewrites 127.0.0.1 in an address to the machine's outward IP; this (despite its name) makes
# every Ray the tests start or attach to stay on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def short_tmp_path():
    """A temporary directory with a short path, for a job's TMPDIR or RAY_TMPDIR: Ray puts its
    sockets under it, and a Unix socket's path must stay under 108 bytes (tmp_path's are longer)."""
    path = Path(tempfile.mkdtemp(prefix="lmbatch-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """One built-in model cache per test session, shared with Ray workers through the environment."""
    path = tmp_path_factory.mktemp("lmbatch-cache")
    os.environ["LMBATCH_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from lmbatch.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    from lmbatch.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    from lmbatch.models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "tiny-bert"))


@pytest.fixture(scope="session")
def tiny_roberta(tiny_bert, tmp_path_factory) -> str:
    """An encoder whose positions start after the pad id's, as RoBERTa's and XLM-R's do (e5-multilingual,
    BGE-M3): 512 tokens take positions 2..513 of 514. With tiny-bert's tokenizer, whose pad id is 0."""
    import torch
    from transformers import AutoModel, AutoTokenizer, RobertaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, pad_token_id=tokenizer.pad_token_id,
                           max_position_embeddings=tokenizer.model_max_length + tokenizer.pad_token_id + 1)
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("tiny-roberta")
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def lora_adapter(tiny_llama, tmp_path_factory) -> str:
    """A LoRA adapter of tiny_llama (random, not zero, so that it changes the output), as peft saves one."""
    return str(save_lora_adapter(tiny_llama, tmp_path_factory.mktemp("lora"), seed=0))


def save_lora_adapter(base, directory, seed: int):
    """A LoRA adapter of `base` (a model directory, or a model), random, saved in `directory`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base) if isinstance(base, str) else base,
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(directory)
    return directory


def save_classifier(base: str, directory: Path, labels: list[str], problem_type: str | None = None) -> str:
    """A sequence classifier of `base`'s architecture (a *ForSequenceClassification, random weights) with its
    tokenizer, its labels named in its config as a fine-tuned classifier's are."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(base, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id={name: i for i, name in enumerate(labels)}, problem_type=problem_type)
    torch.manual_seed(2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(base).save_pretrained(directory)
    return str(directory)


def save_headless(model_path: str, directory: Path) -> str:
    """The model without its LM head, with its tokenizer, as embedding models are often saved (a
    Qwen3Model, not a Qwen3ForCausalLM)."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(model_path).save_pretrained(directory)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(directory)
    return str(directory)


def varied_prompts(n: int, seed: int = 0, max_words: int = 300) -> list[str]:
    """Prompts from one word to several hundred tokens, in shuffled order."""
    from lmbatch.input.builtin import WORDS

    rng = random.Random(seed)
    lengths = [1, 2, 3, max_words] + [int(rng.lognormvariate(2.5, 1.2)) + 1 for _ in range(n - 4)]
    rng.shuffle(lengths)
    return [" ".join(rng.choice(WORDS) for _ in range(min(k, max_words))) for k in lengths]


def write_prompts(path: Path, prompts: list, ids: list | None = None, **extra_columns) -> Path:
    ids = list(range(len(prompts))) if ids is None else ids
    table = pa.table({"id": ids, "prompt": pa.array(prompts, pa.string()), **extra_columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def oracle(model_path, prompt, max_new_tokens, add_special_tokens=True):
    """model.generate on the prompt alone, decoded the way the job decodes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = oracle.models.setdefault(model_path, AutoModelForCausalLM.from_pretrained(model_path))
    ids = tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


oracle.models = {}


def choice_oracle(model_path, prompt, choices) -> tuple[str, int]:
    """model.generate on the prompt alone, greedy, under transformers' own constraint
    (prefix_allowed_tokens_fn) to the tokens of the choices and then an EOS: (the choice, tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = oracle.models.setdefault(model_path, AutoModelForCausalLM.from_pretrained(model_path))
    labels = {tuple(tok(c, add_special_tokens=False).input_ids): c for c in choices}
    ids = tok(prompt, return_tensors="pt").input_ids

    def allowed(_, sequence):
        done = tuple(sequence[ids.shape[1]:].tolist())
        return sorted({label[len(done)] if len(label) > len(done) else tok.eos_token_id
                       for label in labels if label[:len(done)] == done}) or [tok.eos_token_id]
    out = model.generate(ids, max_new_tokens=max(map(len, labels)) + 1, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, prefix_allowed_tokens_fn=allowed)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == tok.eos_token_id
    return labels[tuple(new[:-1])], len(new)


def compose(*overrides: str):
    """Compose the real primary config with overrides, as `python jobs/generate.py ...` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lmbatch.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="generate", overrides=list(overrides))


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray bound to loopback, shared by one test module and shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()
