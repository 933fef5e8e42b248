"""Checks of what the prompts ask of the tokenizer: the chat template (and the variables the job hands
it), structured output's patterns, and choices written without the space a model puts before them.
"""

from __future__ import annotations

from typing import Optional

from lmbatch.config import JobConfig
from lmbatch.decoding.structured import Indexes, PatternError, pattern
from lmbatch.errors import JobError
from lmbatch.models.architecture import ending_ids
from lmbatch.models.tokens import encode


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
