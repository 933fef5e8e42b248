"""The checks a plan runs on the model, its adapter and its tokenizer before anything starts: that
they load, that the adapter fits the model, that the chat template renders the job's conversations
with the variables it is given, and that a json_schema or regex can be followed. Each failure is one
readable `JobError`; what is only likely a mistake is a note."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional

from lmbatch.config import JobConfig, ModelConfig
from lmbatch.errors import JobError
from lmbatch.storage import absolute
from lmbatch.models import is_classifier, reads_both_ways
from lmbatch.models.architecture import cross_encoder_function, ending_ids, score_function
from lmbatch.models.files import adapter_misfit, tokenizer_source
from lmbatch.decoding.structured import Indexes, PatternError
from lmbatch.prepare.tokens import encode, load_tokenizer
from lmbatch.decoding.structured import pattern


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
    if notes := sentence_transformers_notes(job, local, revision, limit):
        print(f"lmbatch: warning: {job.model.path} is a sentence-transformers model whose own pipeline (modules.json) "
              f"differs from this job's, so its vectors will differ from its encode(): it {'; it '.join(notes)}")
    if job.generation.classify and (note := cross_encoder_note(config)):
        print(f"lmbatch: warning: {job.model.path} {note}")
    model = dataclasses.replace(job.model, path=path, revision=revision, adapter=adapter, adapters=adapters)
    return model, limit, kv_cache_bytes_per_token(text_config, job.replica_dtype)


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


def check_structured(job: JobConfig, tokenizer, model_eos) -> None:
    """Structured output that cannot run stops the job here, not as every row's error: no outlines-core, a
    tokenizer whose tokens cannot be spelled as bytes, no EOS, or a job-level json_schema or regex that no
    text of the tokenizer's can match (compiled once here, as each replica compiles it again)."""
    if not job.held_to_pattern:
        return
    g = job.generation
    key = "generation.regex" if g.regex is not None else "generation.json_schema"
    try:
        indexes = Indexes(tokenizer, ending_ids(model_eos, tokenizer))  # as each replica will build it
        if regex := pattern(g):
            indexes.index(regex)
    except PatternError as e:
        message = str(e).removeprefix("invalid parameter: ")
        raise JobError(f"generation.{message}" if message.startswith("json_schema") else f"{key}: {message}") from None


def unspaced_choices(job: JobConfig, tokenizer) -> Optional[str]:
    """A likely mistake in generation.choices: labels without the leading space a model writes after a
    prompt that ends in a word or a colon ("Sentiment:"), where the space is part of the label's token.
    Forced to spell the label otherwise, the model's answer and its probabilities mean little."""
    template = job.input.template or "?"  # a prompt of its own most often ends in a word or a colon
    if job.input.chat or template[-1:].isspace():
        return None
    for choice in job.generation.choices:
        alone, spaced = (encode(tokenizer, [text], add_special_tokens=False)[0] for text in (choice, " " + choice))
        if not choice[:1].isspace() and len(spaced) < len(alone):
            return (f"generation.choices holds {choice!r}, which the model's tokens spell in {len(alone)} but "
                    f"{' ' + choice!r} in {len(spaced)}: after a prompt that ends in a word or a colon a model "
                    f"writes the space, so write the labels with it ({' ' + choice!r}) unless the prompt ends in one")
    return None


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


def check_chat_template(job: JobConfig, tokenizer, source: str) -> None:
    """The chat template must render the conversation the job builds around each row's text (a
    user message, after the system prompt if any): else every row would become an error row
    (templates raise on what they refuse, e.g. a system message). Conversations of a messages
    column vary by row, so there only the system prompt is tried. The job's own template
    (input.chat_template) is checked instead of the tokenizer's."""
    own = job.input.chat_template
    if not own and not tokenizer.chat_template:
        raise JobError(f"the tokenizer of {source} has no chat template, which input.messages_column, "
                       "input.system_prompt, input.apply_chat_template and input.chat_template_kwargs need "
                       "(give one with input.chat_template)")
    what = "input.chat_template" if own else f"the chat template of {source}"
    variables = job.input.chat_template_kwargs
    if taken := sorted(set(variables) & {"conversation", "messages", "tokenize", "add_generation_prompt"}):
        raise JobError(f"input.chat_template_kwargs cannot set {', '.join(taken)}: lmbatch passes the chat template "
                       "each row's messages, with the prompt for the model's turn")
    read = template_variables(own or tokenizer.chat_template) if variables else None  # parsed only to check them
    if read is not None and set(variables) - read:
        raise JobError(f"input.chat_template_kwargs sets {', '.join(sorted(set(variables) - read))}, which "
                       f"{what} does not read, so it would change nothing; it reads {', '.join(sorted(read))}")
    if own:
        try:  # as transformers compiles it: a template that is not Jinja stops the job, not each row
            from transformers.utils import chat_template_utils

            chat_template_utils._compile_jinja_template(own)
        except Exception as e:  # noqa: BLE001 - jinja's syntax errors, of whatever kind
            raise JobError(f"input.chat_template is not a template transformers can render: {e}") from None
    if job.input.messages_column and not job.input.system_prompt:
        return
    system = [{"role": "system", "content": job.input.system_prompt}] if job.input.system_prompt else []
    try:
        tokenizer.apply_chat_template([*system, {"role": "user", "content": "Hello"}], tokenize=False,
                                      add_generation_prompt=True, chat_template=own, **variables)
    except Exception as e:  # noqa: BLE001 - whatever the template raises
        raise JobError(f"{what} fails on a single user message"
                       f"{' after input.system_prompt' if system else ''}: {e}") from None


def template_variables(chat_template) -> Optional[set[str]]:
    """The variables a chat template reads from its caller; None where it cannot be parsed here (a
    template of tags that transformers alone knows), so that nothing is refused for that."""
    import jinja2.meta
    from transformers.utils import chat_template_utils

    sources = chat_template.values() if isinstance(chat_template, dict) else [chat_template]
    try:  # parsed in the environment transformers renders it in (its tags and extensions)
        environment = chat_template_utils._compile_jinja_template("").environment
        return set().union(*(jinja2.meta.find_undeclared_variables(environment.parse(s)) for s in sources))
    except Exception:  # noqa: BLE001 - a private function of transformers, or a template it alone parses
        return None
