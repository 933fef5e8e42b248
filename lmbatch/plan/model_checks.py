"""The checks a plan runs on the model, its adapter and its tokenizer before anything starts: that
they load, that the adapter fits the model, that the chat template renders the job's conversations
with the variables it is given, and that a json_schema or regex can be followed. Each failure is one
readable `JobError`; what is only likely a mistake is a note."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from lmbatch.config import JobConfig, ModelConfig
from lmbatch.errors import JobError
from lmbatch.models import is_classifier, reads_both_ways
from lmbatch.models.files import adapter_misfit, tokenizer_source
from lmbatch.models.remote import is_remote
from lmbatch.models.tokens import load_tokenizer
from lmbatch.plan.encoder_notes import cross_encoder_note, sentence_transformers_notes
from lmbatch.plan.engine_checks import check_vllm
from lmbatch.plan.prompt_checks import check_chat_template, check_structured, unspaced_choices
from lmbatch.storage import absolute


def check_model(job: JobConfig) -> tuple[ModelConfig, Optional[int], Optional[int]]:
    """(the model config as workers should see it: a local path absolute, a hub model pinned to its
    commit; context length; KV cache bytes per token in the replicas' dtype). Fails early on a
    missing model."""
    from transformers import AutoConfig

    from lmbatch.models import BUILTIN, kv_cache_bytes_per_token, resolve_model_path
    from lmbatch.models.architecture import load_generation_config, settings_not_applied
    from lmbatch.models.files import check_weights, hub_commit

    path, revision = job.model.path, job.model.revision
    if not path.startswith(BUILTIN):
        expanded = os.path.expanduser(path)
        if os.path.exists(expanded):
            path = os.path.abspath(expanded)
            if Path(path, ADAPTER_CONFIG).is_file() and not Path(path, "config.json").exists():
                base = json.loads(Path(path, ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
                raise JobError(f"model.path {job.model.path} holds a PEFT adapter, not a model: set model.path to "
                               f"the model it was fine-tuned from (its {ADAPTER_CONFIG} names {base}) and "
                               f"model.adapter={job.model.path}")
            try:
                check_weights(path)
            except ValueError as e:
                raise JobError(f"model.path {job.model.path}: {e}") from None
        elif expanded.startswith(("/", ".")):
            raise JobError(f"model.path {job.model.path} does not exist")
        elif is_remote(path):
            check_model_in_bucket(path)
    try:
        local = resolve_model_path(path)
        config = AutoConfig.from_pretrained(local, trust_remote_code=job.model.trust_remote_code, revision=revision)
        hub = not os.path.isdir(local)
        if hub:  # pinned to the commit its config came from: the checks below and every worker load that one
            revision = hub_commit(path, revision) or revision
    except Exception as e:  # noqa: BLE001 - hub, parsing and remote-code errors alike
        raise JobError(f"model.path {job.model.path} cannot be loaded: {str(e).splitlines()[0]}") from None
    if revision and not hub:
        raise JobError(f"model.revision={revision} names a commit of a hub model, but model.path {job.model.path} "
                       "is a local directory")
    adapter = check_adapter(job.model.adapter, config, job.model.trust_remote_code)
    adapters = {name: check_adapter(local, config, job.model.trust_remote_code, key=f"model.adapters.{name}")
                for name, local in job.model.adapters.items()}
    # The model's tokenizer, or the adapter's own where it holds one; `source` names it in messages.
    tokenizer_path, tokenizer_revision = tokenizer_source(path, revision, adapter)
    own = tokenizer_path == adapter
    source = f"model.adapter {job.model.adapter}" if own else job.model.path
    try:  # called as plan_job calls it again, which then finds this load cached
        tokenizer = load_tokenizer(tokenizer_path, job.model.trust_remote_code, revision=tokenizer_revision)
    except Exception as e:  # noqa: BLE001 - hub, parsing and remote-code errors alike
        what = f"the tokenizer in {source}" if own else f"model.path {job.model.path}"
        raise JobError(f"{what} cannot be loaded: {str(e).splitlines()[0]}") from None
    if job.input.chat:
        check_chat_template(job, tokenizer, source)
    if note := unspaced_choices(job, tokenizer):
        print(f"lmbatch: note: {note}")
    generation_config = load_generation_config(path, revision)
    check_structured(job, tokenizer, generation_config.eos_token_id)
    ignored = {k: v for k, v in settings_not_applied(generation_config).items()
               if getattr(job.generation, k, None) != v}  # what the job sets alike is applied, as the job's
    if ignored:
        print(f"lmbatch: note: the generation_config.json of {job.model.path} sets "
              f"{', '.join(f'{k}={v}' for k, v in ignored.items())}, which lmbatch does not apply: it generates "
              "with the job's generation.* settings alone, so that the config saved with the output says all "
              "that shaped it")
    text_config = getattr(config, "get_text_config", lambda: config)()
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if reads_both_ways(config) and tokenizer.model_max_length < 10**9:  # not transformers' "unset"
        # An encoder's tokenizer knows its length better: RoBERTa's positions start after the pad id's
        # (514 positions hold 512 tokens), and sentence-transformers saves the length it embeds at there.
        limit = min(limit or tokenizer.model_max_length, tokenizer.model_max_length)
    vocab = getattr(text_config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:  # tokens added to the tokenizer, the model's embedding not resized
        print(f"lmbatch: warning: the tokenizer of {source} has {len(tokenizer):,} tokens, the model's "
              f"embedding {vocab:,}: a row holding one of the last {len(tokenizer) - vocab:,} fails "
              "(index out of range)")
    # the tokenizer's chat template renders the prompts unless they are plain or the job brings its own
    check_shared_tokenizer(adapters, tokenizer, job.model.trust_remote_code,
                           templated=job.input.chat and not job.input.chat_template)
    check_model_use(job, config, text_config)
    if job.engine == "vllm":
        check_vllm(job, text_config)
    if notes := sentence_transformers_notes(job, local, revision, limit):
        print(f"lmbatch: warning: {job.model.path} is a sentence-transformers model whose own pipeline (modules.json) "
              f"differs from this job's, so its vectors will differ from its encode(): it {'; it '.join(notes)}")
    if job.generation.classify and (note := cross_encoder_note(config)):
        print(f"lmbatch: warning: {job.model.path} {note}")
    model = dataclasses.replace(job.model, path=path, revision=revision, adapter=adapter, adapters=adapters)
    return model, limit, kv_cache_bytes_per_token(text_config, job.replica_dtype)


def check_model_in_bucket(uri: str) -> None:
    """What check_model checks of a local directory, of a model in a bucket, where it is: its weights by
    their headers (none copied here; the replicas copy the model, each node once)."""
    from lmbatch.models.files import check_weights
    from lmbatch.models.remote import ModelFiles

    try:
        files = ModelFiles(uri).files
    except OSError as e:
        raise JobError(f"model.path {uri} cannot be read: {e}") from None
    if not files:
        raise JobError(f"model.path {uri} does not exist (no files under it)")
    if ADAPTER_CONFIG in files and "config.json" not in files:
        raise JobError(f"model.path {uri} holds a PEFT adapter, not a model: set model.path to the model it was "
                       "fine-tuned from and model.adapter to a local copy of the adapter")
    try:
        check_weights(uri)
    except (ValueError, OSError) as e:
        raise JobError(f"model.path {uri}: {e}") from None


def check_model_use(job: JobConfig, config, text_config) -> None:
    """What the job asks of the model against what the model is: a classifier (its head labels text) only
    classifies, and an encoder (it reads text both ways) only embeds, besides; generation.classify needs a
    classifier; input.pair_column an encoder; `cls` pooling is refused for a decoder, whose first token sees
    nothing after it; generation.embedding_dimensions within the model's hidden size; and a warning for a model
    saved without a language-model head (an embedding model, as a Qwen3Model), which loads with a random (or
    tied) one."""
    g, hidden = job.generation, getattr(text_config, "hidden_size", None)
    architectures = getattr(config, "architectures", None) or []
    name = architectures[0] if architectures else config.model_type
    without = "".join(f", without generation.{k}" for k in ("prompt_logprobs", "logprobs", "choices", "json_schema",
                                                            "regex") if getattr(g, k))
    if is_classifier(config):
        if g.max_new_tokens or without or not g.classify:
            raise JobError(f"{job.model.path} is a classifier ({name}): its head labels text, and it cannot generate "
                           "or score text: set generation.classify=true and generation.max_new_tokens=0" + without)
    elif g.classify:
        raise JobError(f"generation.classify needs a classifier (a fine-tuned *ForSequenceClassification), and "
                       f"{job.model.path} is a {name}")
    elif reads_both_ways(config):
        if g.max_new_tokens or not g.embedding or without:
            raise JobError(f"{job.model.path} is an encoder ({name}): it reads text both ways, so it embeds but "
                           "cannot generate or score text: set generation.max_new_tokens=0 and generation.embedding="
                           "cls or mean, as its model card says it pools (experiment=embed, with its pooling)"
                           + without)
    if job.input.pair_column and not reads_both_ways(config):
        raise JobError(f"input.pair_column is read by encoders (cross-encoders, NLI classifiers), which tell a "
                       f"pair's texts apart; {job.model.path} is a decoder ({name}): put both texts in the prompt "
                       "with input.template instead")
    if g.embedding == "cls" and not reads_both_ways(config):
        raise JobError(f"generation.embedding=cls pools the first token, which in a decoder ({name}) has seen "
                       "nothing after it: prompts that begin alike (with a BOS token) would all get one vector; "
                       "use last or mean")
    if g.embedding_dimensions and hidden and g.embedding_dimensions > hidden:
        raise JobError(f"generation.embedding_dimensions={g.embedding_dimensions} exceeds the {hidden} dimensions "
                       f"of {job.model.path}'s hidden states")
    # transformers' names; remote code names its classes as it likes (ChatGLMModel holds its head)
    headless = architectures and not job.model.trust_remote_code and not any(
        a.endswith(("LMHeadModel", "ForCausalLM", "ForConditionalGeneration")) for a in architectures)
    if headless and (g.max_new_tokens or g.prompt_logprobs):
        print(f"lmbatch: warning: {job.model.path} is a {architectures[0]}, saved without a language-model head "
              "(an embedding model?): the head it loads with was not trained with it, so its texts and "
              "log-probabilities mean little. For embeddings alone, set generation.max_new_tokens=0")


ADAPTER_CONFIG = "adapter_config.json"


def check_adapter(adapter: Optional[str], model_config, trust_remote_code: bool,
                  key: str = "model.adapter") -> Optional[str]:
    """model.adapter (or the adapter at `key`), absolute, once it is found to be an adapter peft can merge
    into the weights of the model `model_config` describes (its layers and their sizes: replicas would
    fail to load it)."""
    if adapter is None:
        return None
    path = absolute(adapter)
    if not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        found = f"holds no {ADAPTER_CONFIG}" if os.path.isdir(path) else "does not exist"
        raise JobError(f"{key} {adapter} {found}: it must be a local directory that peft's save_pretrained "
                       "wrote (download a hub adapter first, with `hf download`)")
    try:
        from peft import PeftConfig
    except ImportError:
        raise JobError(f"{key} needs the peft package: pip install peft") from None
    try:
        config = PeftConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a config peft cannot read, of whatever kind
        raise JobError(f"{key} {adapter} cannot be read: {str(e).splitlines()[0]}") from None
    if config.is_prompt_learning:
        kind = getattr(config.peft_type, "value", config.peft_type)  # an enum of strings
        raise JobError(f"{key} {adapter} is a {kind} adapter, which does not merge into the "
                       "weights; lmbatch takes adapters that do (LoRA and its kin)")
    misfit = adapter_misfit(model_config, path, trust_remote_code)
    if misfit:
        raise JobError(f"{key} {adapter} does not fit model.path: {misfit}; was it fine-tuned from another "
                       f"model? (its {ADAPTER_CONFIG} names {config.base_model_name_or_path})")
    return path


def check_shared_tokenizer(adapters: dict[str, str], tokenizer, trust_remote_code: bool, templated: bool) -> None:
    """The adapters of model.adapters are read with the model's tokenizer: one that holds a tokenizer of its
    own (a fine-tune that added tokens or set a chat template saves it there) must hold the same one, its
    chat template too where the job renders prompts with the tokenizer's (`templated`)."""
    for name, local in adapters.items():
        if not os.path.isfile(os.path.join(local, "tokenizer_config.json")):
            continue
        own = load_tokenizer(local, trust_remote_code)
        same_template = not templated or own.chat_template == tokenizer.chat_template
        differs = [what for what, same in (("vocabulary", own.get_vocab() == tokenizer.get_vocab()),
                                           ("chat template", same_template)) if not same]
        if differs:
            raise JobError(f"model.adapters.{name} {local} holds a tokenizer whose {' and '.join(differs)} "
                           f"{'differ' if len(differs) > 1 else 'differs'} from model.path's, which every row is read "
                           "with: adapters of one job share the model's tokenizer (run this adapter as model.adapter, "
                           "in a job of its own)")


