"""The model checked at plan: adapters, embedding settings, encoders and classifiers, cross-encoders, and
choices written without the space a model puts before them.
"""


import json
import math
import re

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from helpers.config import compose
from helpers.data import one_prompt, write_prompts
from helpers.models import THINKING_CHAT_TEMPLATE, save_classifier, save_headless, save_lora_adapter
from helpers.tally import TALLY
from lmbatch.config import BatchingConfig, ConfigError
from lmbatch.engine.hf import HFEngine
from lmbatch.errors import JobError
from lmbatch.models import model_identity
from lmbatch.plan.dry_run import dry_run
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.rows import row_prompt
from lmbatch.prepare.settings import PROMPT_IDS


def test_labels_without_the_space_a_model_writes_are_noted(tmp_path, capsys):
    """generation.choices=[the] after "Answer:": the tiny tokenizer spells " the" in one token and
    "the" in two, so the model would be forced into unlikely tokens. The job says so, and is quiet
    for " the", and for a template that ends in a space."""
    source = one_prompt(tmp_path)
    for choices, template, noted in [("[the,a]", "Q: {prompt} Answer:", True), ('[" the"," a"]', "Q: {prompt} Answer:",
                                      False), ("[the,a]", "Q: {prompt} Answer: ", False)]:
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                       f"generation.choices={choices}", f"input.template='{template}'")))
        said = capsys.readouterr().out
        assert ("lmbatch: note: generation.choices holds 'the', which the model's tokens spell in 2 but ' the' in 1"
                in said) == noted, (choices, template, said)


def test_an_adapter_is_part_of_the_job_and_of_the_model_it_checks(tmp_path, tiny_llama, tiny_gpt2):
    """model.adapter makes another job (fingerprint), an adapter retrained in place is another model
    (a partial output is not resumed with it), and an adapter given as model.path is named as one."""
    adapter = save_lora_adapter(tiny_llama, tmp_path / "adapter", seed=0)
    source = one_prompt(tmp_path)
    out = tmp_path / "out"

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={out}", f"model.path={tiny_llama}",
                                              *extra)))
    with_adapter = plan(f"model.adapter={adapter}")
    assert with_adapter.fingerprint != plan().fingerprint
    assert with_adapter.model_identity == f"{model_identity(tiny_llama)} with adapter {model_identity(str(adapter))}"
    with_adapter.begin_output()  # a run that died before its first part
    save_lora_adapter(tiny_llama, adapter, seed=1)  # retrained in place
    with pytest.raises(JobError, match="holds part of this job made with other model files than model.path holds now"):
        plan(f"model.adapter={adapter}")
    said = (f"model.path {adapter} holds a PEFT adapter, not a model: set model.path to the model it was fine-tuned "
            f"from (its adapter_config.json names {tiny_llama}) and model.adapter={adapter}")
    with pytest.raises(JobError, match=f"^{re.escape(said)}$"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'other'}",
                                       f"model.path={adapter}")))
    # An adapter fine-tuned from another model: one with other layers, one with wider ones.
    with pytest.raises(JobError, match=f"^model.adapter {adapter} does not fit model.path: Target modules .* not "
                                       "found in the base model"):
        plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'other'}",
                                       f"model.path={tiny_gpt2}", f"model.adapter={adapter}")))
    config = AutoConfig.from_pretrained(tiny_llama)
    config.hidden_size *= 2
    wider = save_lora_adapter(AutoModelForCausalLM.from_config(config), tmp_path / "wider", seed=0)
    with pytest.raises(JobError, match=r"does not fit model.path: 4 of its 8 tensors have other shapes than the "
                                       r"model's layers give them \(base_model.model.model.layers.0.self_attn.q_proj."
                                       r"lora_A.weight: \[4, 128\] in the adapter, \[4, 64\] for the model\)"):
        plan(f"model.adapter={wider}")

    from peft import PromptTuningConfig

    PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4).save_pretrained(tmp_path / "prompt-tuning")
    with pytest.raises(JobError, match="is a PROMPT_TUNING adapter, which does not merge into the weights"):
        plan(f"model.adapter={tmp_path / 'prompt-tuning'}")
    TALLY["bad_input_kinds"].update(["an adapter retrained during a job", "an adapter as model.path",
                                     "an adapter that does not merge"])


def test_several_adapters_are_part_of_the_job_and_checked_each(tmp_path, tiny_llama):
    """model.adapters: each is checked as model.adapter is, names the job (fingerprint) and the model it is
    made with (identity), must share the model's tokenizer, and is what generation.adapter names."""
    first, second = (save_lora_adapter(tiny_llama, tmp_path / name, seed=s) for s, name in enumerate(["a", "b"]))
    source = one_prompt(tmp_path)

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={tiny_llama}", *extra)))
    both = plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}")  # as docs/prompts-and-settings.md adds them
    assert both.job.model.adapters == {"first": str(first), "second": str(second)}
    assert both.model_identity == (f"{model_identity(tiny_llama)} with adapters first {model_identity(str(first))}, "
                                   f"second {model_identity(str(second))}")
    assert len({plan().fingerprint, both.fingerprint, plan(f"+model.adapters.first={first}").fingerprint,
                plan(f"+model.adapters.first={first}", "generation.adapter=first").fingerprint}) == 4
    with pytest.raises(JobError, match=f"^model.adapters.other {tmp_path} holds no adapter_config.json"):
        plan(f"++model.adapters={{first: {first}, other: {tmp_path}}}")  # a mapping at once
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    tokenizer.save_pretrained(second)
    with pytest.raises(JobError, match=f"^model.adapters.second {second} holds a tokenizer whose chat template differs "
                                       "from model.path's"):
        plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}", "input.apply_chat_template=true")
    # a chat template that renders no prompt does not matter: plain prompts, or the job's own template
    (tmp_path / "own.jinja").write_text("{{ messages[0]['content'] }}")
    for own in ([], ["input.apply_chat_template=true", f"input.chat_template={tmp_path / 'own.jinja'}"]):
        plan(f"+model.adapters.first={first}", f"+model.adapters.second={second}", *own)
    for overrides, message in [(["generation.adapter=third", f"+model.adapters.first={first}"],
                                "generation.adapter=third is not one of model.adapters (first)"),
                               (["generation.adapter=first"], "generation.adapter=first is not one of model.adapters, "
                                                              "which names none"),
                               (["input.param_columns=[adapter]"], "input.param_columns names adapter, but "
                                                                   "model.adapters names none"),
                               ([f"model.adapter={first}", f"+model.adapters.first={first}"],
                                "model.adapter and model.adapters: set one")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            plan(*overrides)


def test_embedding_settings_are_checked_against_the_model(tmp_path, tiny_llama, capsys):
    """generation.embedding and the keys that shape it name the job (its fingerprint), the others only with
    it; embedding_dimensions beyond the model's hidden size stops the job as it plans; a model saved without
    its LM head (an embedding model) is warned of when it generates texts, not when it only embeds; the dry
    run of a job that only embeds speaks of no decode steps or KV cache."""
    headless, source = save_headless(tiny_llama, tmp_path / "headless"), one_prompt(tmp_path)

    def plan(*extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", *extra)))
    with pytest.raises(JobError, match=re.escape(f"generation.embedding_dimensions=65 exceeds the 64 dimensions of "
                                                 f"{tiny_llama}'s hidden states")):
        plan(f"model.path={tiny_llama}", "generation.embedding=last", "generation.embedding_dimensions=65")
    embedded = [plan(f"model.path={tiny_llama}", *extra).fingerprint for extra in [
        (), ("generation.embedding=last",), ("generation.embedding=mean",),
        ("generation.embedding=last", "generation.embedding_dimensions=64"),
        ("generation.embedding=last", "generation.embedding_normalize=false")]]
    assert len(set(embedded)) == 5  # each is another job; and without embedding, its other keys change nothing:
    assert plan(f"model.path={tiny_llama}", "generation.embedding_normalize=false").fingerprint == embedded[0]
    plan(f"model.path={headless}")
    assert f"warning: {headless} is a LlamaModel, saved without a language-model head" in capsys.readouterr().out
    embedding_alone = plan(f"model.path={headless}", "generation.max_new_tokens=0", "generation.embedding=last")
    plan(f"model.path={tiny_llama}")
    assert "language-model head" not in capsys.readouterr().out
    dry_run(embedding_alone)  # says what such a job computes: no decode steps, no KV cache
    said = capsys.readouterr().out
    assert "nothing is generated: each micro-batch is one forward pass over its prompts" in said
    assert "decode steps" not in said and "KV cache" not in said


def test_an_encoder_only_embeds_and_its_sentence_transformers_pipeline_is_compared(tmp_path, tiny_llama, tiny_bert,
                                                                                  tiny_roberta, capsys):
    """An encoder (BERT, RoBERTa) is refused for anything but embedding, as the job plans; `cls` pooling is
    refused for a decoder; an encoder's context is its tokenizer's length (RoBERTa's 514 positions hold 512
    tokens); a sentence-transformers model whose own pipeline pools otherwise, adds a Dense module, normalizes
    otherwise, cuts texts shorter (as a newer or an older version saves it), puts a default prompt before each
    text or pools without a prompt's tokens is warned of, and one that matches is not."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    source = one_prompt(tmp_path)

    def plan(model, *extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *extra)))
    embed = ("generation.max_new_tokens=0", "generation.embedding=cls")
    with pytest.raises(JobError, match=re.escape(f"{tiny_bert} is an encoder (BertModel): it reads text both ways, "
                                                 "so it embeds but cannot generate or score text: set "
                                                 "generation.max_new_tokens=0 and generation.embedding=cls or mean")):
        plan(tiny_bert)
    with pytest.raises(JobError, match=r", without generation.prompt_logprobs, without generation.logprobs$"):
        plan(tiny_bert, *embed, "generation.prompt_logprobs=true", "generation.logprobs=true")
    with pytest.raises(JobError, match=re.escape("generation.embedding=cls pools the first token, which in a decoder "
                                                 "(LlamaForCausalLM) has seen nothing after it")):
        plan(tiny_llama, *embed)
    assert plan(tiny_roberta, *embed).settings.context_limit == plan(tiny_bert, *embed).settings.context_limit == 512
    assert AutoConfig.from_pretrained(tiny_roberta).max_position_embeddings == 513
    assert "warning" not in capsys.readouterr().out

    modules = [Transformer(tiny_bert), Pooling(64, pooling_mode="cls"), Normalize()]
    SentenceTransformer(modules=modules).save(str(tmp_path / "st"))
    SentenceTransformer(modules=[*modules[:2], Dense(64, 32), Normalize()]).save(str(tmp_path / "dense"))
    plan(tmp_path / "st", *embed)
    assert "warning" not in capsys.readouterr().out
    plan(tmp_path / "dense", "generation.max_new_tokens=0", "generation.embedding=mean",
         "generation.embedding_normalize=false")
    assert (f"warning: {tmp_path / 'dense'} is a sentence-transformers model whose own pipeline (modules.json) "
            "differs from this job's, so its vectors will differ from its encode(): it pools by cls "
            "(generation.embedding=cls); it has a Dense module, which lmbatch does not apply; it normalizes its "
            "vectors (generation.embedding_normalize=true)") in capsys.readouterr().out
    # as versions before 6 save it (all-MiniLM-L6-v2's files): pooling flags, and the length it embeds at
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (tmp_path / "st" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256}))
    plan(tmp_path / "st", *embed)
    assert ("its encode(): it pools by mean_tokens (generation.embedding=mean); it embeds at most 256 tokens (its "
            "max_seq_length: input.max_prompt_tokens=256 input.on_too_long=truncate_end cuts as it does)"
            ) in capsys.readouterr().out
    plan(tmp_path / "st", "generation.max_new_tokens=0", "generation.embedding=mean", "input.max_prompt_tokens=256")
    assert "warning" not in capsys.readouterr().out
    # E5-style: a prompt its encode() puts before every text, and pooling that leaves the prompt's tokens out
    modules = [Transformer(tiny_bert), Pooling(64, pooling_mode="mean", include_prompt=False), Normalize()]
    prompted = SentenceTransformer(modules=modules, prompts={"query": "query: {x} ", "passage": "passage: "},
                                   default_prompt_name="query")
    prompted.save(str(tmp_path / "prompted"))
    assert prompted.encode("a").tolist() != prompted.encode("query: {x} a", prompt="").tolist()
    prompted[1].include_prompt = True  # pooled over prompt and text, as lmbatch pools the templated text
    assert prompted.encode("a").tolist() == prompted.encode("query: {x} a", prompt="").tolist()
    embed = ("generation.max_new_tokens=0", "generation.embedding=mean")
    write_prompts(source, ["a"], text=["a"])
    plan(tmp_path / "prompted", *embed, "input.prompt_column=text")
    assert ("its encode(): it pools without the tokens of its prompt, which lmbatch pools with; it puts "
            "\"query: {x} \" before every text (its default_prompt_name, query): "
            "'input.template=\"query: {{x}} {text}\"' does as it does") in capsys.readouterr().out
    templated = plan(tmp_path / "prompted", *embed, "input.prompt_column=text", "input.template='query: {{x}} {text}'")
    assert capsys.readouterr().out.endswith("encode(): it pools without the tokens of its prompt, which lmbatch pools "
                                           "with\n")  # and no more
    assert row_prompt({"id": 0, "text": "a"}, templated.settings) == "query: {x} a"  # the text encode() embeds


def test_a_classifier_only_classifies(tmp_path, tiny_llama, tiny_bert):
    """A classifier (a *ForSequenceClassification) is refused for anything but classifying (and embedding
    beside), and generation.classify for a model that is not one; classify names another job."""
    classifier, source = save_classifier(tiny_bert, tmp_path / "classifier", ["no", "yes"]), one_prompt(tmp_path)

    def plan(model, *extra):
        return plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *extra)))
    with pytest.raises(JobError, match=re.escape(f"{classifier} is a classifier (BertForSequenceClassification): its "
                                                 "head labels text, and it cannot generate or score text: set "
                                                 "generation.classify=true and generation.max_new_tokens=0")):
        plan(classifier)
    with pytest.raises(JobError, match=r"max_new_tokens=0, without generation.prompt_logprobs$"):
        plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "generation.prompt_logprobs=true")
    for model, name in [(tiny_llama, "LlamaForCausalLM"), (tiny_bert, "BertModel")]:
        with pytest.raises(JobError, match=re.escape(f"generation.classify needs a classifier (a fine-tuned "
                                                     f"*ForSequenceClassification), and {model} is a {name}")):
            plan(model, "generation.max_new_tokens=0", "generation.classify=true")
    classifying = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true")
    both = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "generation.embedding=cls")
    assert classifying.settings.context_limit == 512 and classifying.fingerprint != both.fingerprint
    with pytest.raises(ConfigError, match="or generation.classify: score, embed or classify the prompts"):
        plan(classifier, "generation.max_new_tokens=0")
    # input.pair_column: a second text read with each prompt, by an encoder only; part of the job
    write_prompts(source, ["a"], passage=["b"])
    pairs = plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "input.pair_column=passage")
    assert pairs.fingerprint != classifying.fingerprint and "passage" in pairs.settings.row_columns
    with pytest.raises(JobError, match=re.escape(f"input.pair_column is read by encoders (cross-encoders, NLI "
                                                 f"classifiers), which tell a pair's texts apart; {tiny_llama} is a "
                                                 "decoder (LlamaForCausalLM)")):
        plan(tiny_llama, "generation.max_new_tokens=0", "generation.embedding=last", "input.pair_column=passage")
    with pytest.raises(JobError, match="has no column 'hypothesis'"):
        plan(classifier, "generation.max_new_tokens=0", "generation.classify=true", "input.pair_column=hypothesis")


def test_a_cross_encoder_that_gives_its_logits_is_warned_of(tmp_path, tiny_bert, capsys):
    """sentence-transformers' CrossEncoder.predict scores through the activation a reranker's config names:
    ms-marco-MiniLM's names Identity (the logits), where label_scores, as transformers' pipeline gives them, go
    through a sigmoid. The job warns, with the relation between the two, which predict() and the pipeline bear
    out; a config that names none (predict() then applies a sigmoid too) is not warned of."""
    from sentence_transformers import CrossEncoder
    from transformers import pipeline

    reranker = save_classifier(tiny_bert, tmp_path / "reranker", ["relevance"])
    config = json.loads((tmp_path / "reranker" / "config.json").read_text())
    source = write_prompts(tmp_path / "in.parquet", ["a query"], passage=["a passage"])
    job = to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", f"model.path={reranker}",
                                "experiment=classify", "input.pair_column=passage"))
    plan_job(job)
    assert "warning" not in capsys.readouterr().out
    identity = "torch.nn.modules.linear.Identity"
    for saved in ({"sentence_transformers": {"activation_fn": identity}},  # sentence-transformers 4 and later
                  {"sbert_ce_default_activation_function": identity}):  # before
        (tmp_path / "reranker" / "config.json").write_text(json.dumps({**config, **saved}))
        plan_job(job)
        assert (f"warning: {reranker} is a sentence-transformers cross-encoder whose predict() gives its scores "
                "through identity (the logits: ln(p / (1 - p)) of a label score p), which rank alike; label_scores "
                "go through sigmoid, as transformers' text-classification pipeline gives them"
                ) in capsys.readouterr().out
        p = pipeline("text-classification", model=reranker, top_k=None, device="cpu")(
            {"text": "a query", "text_pair": "a passage"})[0]["score"]
        logit = CrossEncoder(reranker, device="cpu").predict([("a query", "a passage")])[0]
        assert logit == pytest.approx(math.log(p / (1 - p)), rel=1e-4, abs=1e-5)


def test_an_adapter_with_a_tokenizer_of_its_own_is_read_with_it(tmp_path, tiny_llama):
    """A fine-tune that set a chat template saves its tokenizer beside the adapter (TRL's trainers do):
    the job checks, renders and decodes with that one, in the plan, the prepare step and the replica."""
    adapter = save_lora_adapter(tiny_llama, tmp_path / "adapter", seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = THINKING_CHAT_TEMPLATE
    tokenizer.save_pretrained(adapter)
    source = write_prompts(tmp_path / "in.parquet", ["what is two and two?"])
    # enable_thinking: a variable only the adapter's template reads
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", f"model.adapter={adapter}",
                                          "+input.chat_template_kwargs.enable_thinking=false")))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "what is two and two?"}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    assert "<think>" in text
    ids = prepare_chunk(plan.chunks[0], plan.settings)[PROMPT_IDS].to_pylist()
    assert ids == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    engine = HFEngine.load(tiny_llama, plan.job.model, BatchingConfig(), device="cpu")
    assert engine.tokenizer.chat_template == THINKING_CHAT_TEMPLATE
