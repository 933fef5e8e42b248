"""Test models saved as users save theirs: adapters, classifiers, headless encoders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


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


# Qwen3's way: with enable_thinking false, an empty thinking block follows the generation prompt.
THINKING_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
    "<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def llama_with_remote_code(tiny_llama, directory, model_class: str):
    """tiny_llama whose model class is `model_class`'s source, a subclass `RemoteLlama` of
    LlamaForCausalLM, as remote code (the job needs model.trust_remote_code=true)."""
    model = directory / "remote-code-model"
    shutil.copytree(tiny_llama, model)
    (model / "modeling_remote.py").write_text("import ctypes, time\nfrom transformers import LlamaForCausalLM\n"
                                              + model_class)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_remote.RemoteLlama"}
    (model / "config.json").write_text(json.dumps(config))
    return model
