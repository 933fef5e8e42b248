"""Shared fixtures: tiny models built locally, Parquet inputs, a loopback Ray; and the reliability figure
line at the end of the run. Helpers the tests import live in tests/helpers/.

Nothing here downloads: models are random-init from a config, saved with save_pretrained and
loaded back through from_pretrained, exactly like a user's local model directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers.data import varied_prompts, write_prompts
from helpers.models import save_lora_adapter
from helpers.tally import figure_line, tallied

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


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray bound to loopback, shared by one test module and shut down after it."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def long_input(tmp_path_factory):
    """Enough chunks (8 rows each) that faults land mid-job."""
    path = write_prompts(tmp_path_factory.mktemp("in") / "prompts.parquet", varied_prompts(400, seed=5, max_words=60),
                         ids=[f"row-{i:04d}" for i in range(400)])
    return path, [f"row-{i:04d}" for i in range(400)]


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2"])
def model_path(request):
    """Each tiny decoder in turn: rotary positions (tiny-llama) and learned absolute ones (tiny-gpt2)."""
    return request.getfixturevalue(request.param)


def pytest_terminal_summary(terminalreporter):
    """The reliability figure line, whatever order and selection of tests ran (a test that had to run
    last printed it before): kinds of bad input tried, faults injected, rows lost, rows duplicated."""
    if tallied():
        terminalreporter.write_line(figure_line())
