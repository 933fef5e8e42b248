"""Jobs that use the generation settings end to end, on a local Ray: per-row settings, choices, structured
output, scores and embeddings, classification, adapters, chat templates. Greedy texts are checked against
transformers on each prompt alone.
"""


import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers.config import compose
from helpers.data import varied_prompts, write_prompts
from helpers.models import save_classifier, save_lora_adapter
from helpers.oracles import choice_oracle, oracle
from lmbatch.output.json_column import arrow_type
from lmbatch.pipeline.run import run
from lmbatch.plan.job import to_job_config

pytestmark = pytest.mark.slow


def test_a_dry_run_shows_the_expression_a_schema_becomes(tmp_path, tiny_llama, capsys):
    from lmbatch.pipeline.run import run

    source = write_prompts(tmp_path / "in.parquet", ["a b"])
    run(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}", f"model.path={tiny_llama}", "dry_run=true",
                "generation.json_schema={type: object, properties: {sure: {type: boolean}}, required: [sure]}"))
    assert ('its text is held to the regular expression \\{[ ]?"sure"[ ]?:[ ]?(true|false)[ ]?\\}\n'
            in capsys.readouterr().out)


def test_the_extract_experiment_is_held_to_its_schema_and_parsed(tmp_path, tiny_llama, capsys):
    """conf/experiment/extract.yaml, as docs/prompts-and-settings.md shows it: the schema in YAML, its column typed."""
    import pyarrow as pa

    from lmbatch.pipeline.run import run

    source = write_prompts(tmp_path / "in.parquet", ["x"], ticket=["I was charged twice."])
    job = compose("experiment=extract", f"input.path={source}", f"output.path={tmp_path / 'out'}",
                  f"model.path={tiny_llama}", "dry_run=true")
    assert arrow_type(to_job_config(job).generation.json_schema) == pa.struct(
        [("team", pa.string()), ("urgent", pa.bool_()), ("summary", pa.string())])
    run(job)
    printed = capsys.readouterr().out
    assert "Ticket: I was charged twice." in printed
    assert 'its text is held to the regular expression \\{[ ]?"team"[ ]?:[ ]?("billing"|' in printed


def prompt_logprob_alone(model_path, prompt) -> float:
    """The model's log-probability of the prompt, each token given those before it, from the prompt alone."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(prompt).input_ids
    with torch.inference_mode():
        each = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    return sum(each[j, t].item() for j, t in enumerate(ids[1:]))


GENERATED = ["generated_text", "num_generated_tokens", "finish_reason", "error"]


def test_per_row_parameters_override_the_config(local_ray, tmp_path, tiny_llama):
    prompts = varied_prompts(6, seed=11, max_words=30)
    # Rows 6-11 repeat prompts, in the second of the two chunks (rows 6-11): 9 has another max_new_tokens
    # than 7, so it is generated; 8 repeats 7 (greedy: copied). Row 10 samples at temperature 0, which is
    # greedy (as in OpenAI's API), so 11, greedy at another temperature, repeats it.
    path = write_prompts(tmp_path / "in.parquet", prompts + [prompts[5], prompts[0], prompts[0], prompts[0],
                                                             prompts[2], prompts[2]],
                         max_new_tokens=pa.array([3, None, 7, 2, 5, 4, 4, None, None, 3, 5, 5], pa.int64()),
                         temperature=pa.array([None, None, None, -1.0, None, 0.5, 0.5, None, None, None, 0.0, 0.3]),
                         do_sample=pa.array([None, None, None, True, None, True, True, None, None, None, True, None]),
                         stop=pa.array([None, None, None, None, "e", None, None, None, None, None, None, None]))
    out = tmp_path / "out"
    run(compose(f"input.path={path}", f"output.path={out}", f"model.path={tiny_llama}", "generation.max_new_tokens=6",
                "input.param_columns=[max_new_tokens,temperature,do_sample,stop]", "cluster.num_replicas=1"))
    rows = pq.read_table(out).to_pylist()
    assert [r["num_generated_tokens"] <= m for r, m in zip(rows, [3, 6, 7, 2, 5, 4])] == [True] * 6
    assert rows[0]["finish_reason"] != "length" or rows[0]["num_generated_tokens"] == 3
    assert rows[2]["finish_reason"] != "length" or rows[2]["num_generated_tokens"] == 7
    assert rows[3]["finish_reason"] == "error" and rows[3]["error"].startswith("invalid parameter: temperature")
    assert "e" not in rows[4]["generated_text"]
    assert rows[0]["generated_text"] == oracle(tiny_llama, prompts[0], 3)
    assert rows[1]["generated_text"] == oracle(tiny_llama, prompts[1], 6)
    assert not any(r["error"] for i, r in enumerate(rows) if i != 3)
    assert rows[7]["generated_text"] == oracle(tiny_llama, prompts[0], 6) and rows[8] == {**rows[7], "id": 8}
    assert rows[9]["generated_text"] == rows[0]["generated_text"]  # generated: the same prompt in another chunk
    assert rows[10]["generated_text"] == oracle(tiny_llama, prompts[2], 5)
    assert {k: rows[11][k] for k in GENERATED} == {k: rows[10][k] for k in GENERATED}
    metrics = json.loads((out / "_metrics.json").read_text())
    assert metrics["rows_repeating_a_prompt"] == 2
    copied = rows[8]["num_generated_tokens"] + rows[11]["num_generated_tokens"]
    assert metrics["generated_tokens"] == sum(r["num_generated_tokens"] for r in rows) - copied
    assert "temperature" in rows[0] and "max_new_tokens" in rows[0]  # parameter columns are kept like any other


def test_choices_make_each_text_one_of_them(local_ray, tmp_path, tiny_llama):
    """Classification: generation.choices for the job, a choices column for some rows (multiple choice
    with options of their own); max_new_tokens does not cut a choice short. With generation.logprobs
    each row has the model's log-probability of its answer (its value: test_engine)."""
    prompts = varied_prompts(8, seed=2, max_words=20)
    own = [None] * 5 + [["red", "green", "dark blue"], ["red", "green", "dark blue"], [""]]
    path = write_prompts(tmp_path / "in.parquet", prompts, choices=pa.array(own, pa.list_(pa.string())))
    out = tmp_path / "out"
    run(compose(f"input.path={path}", f"output.path={out}", f"model.path={tiny_llama}", "cluster.num_replicas=1",
                "generation.choices=[positive,negative,neutral]", "generation.max_new_tokens=1",
                "input.param_columns=[choices]", "generation.logprobs=true", "generation.prompt_logprobs=true"))
    table = pq.read_table(out)
    assert table.schema.names[-3:] == ["logprob", "choice_logprobs", "prompt_logprob"]
    assert table.schema.field("choice_logprobs").type == pa.list_(pa.float64())
    rows = table.to_pylist()
    for row, prompt, choices in zip(rows[:7], prompts, [["positive", "negative", "neutral"]] * 5 + own[5:7]):
        assert (row["generated_text"], row["num_generated_tokens"]) == choice_oracle(tiny_llama, prompt, choices)
        assert row["finish_reason"] == "stop" and row["logprob"] < 0
        scores = row["choice_logprobs"]  # in the order of the row's choices, the answer's its logprob
        assert len(scores) == len(choices)
        assert scores[choices.index(row["generated_text"])] == pytest.approx(row["logprob"], rel=1e-4, abs=1e-4)
    assert rows[7]["error"] == "invalid parameter: choices must be a list of non-empty strings"
    assert rows[7]["logprob"] is None and rows[7]["choice_logprobs"] is None and rows[7]["prompt_logprob"] is None
    # generation.prompt_logprobs: the prompt's own log-probability, as the model alone gives it
    for row, prompt in zip(rows[:7], prompts):
        assert row["prompt_logprob"] == pytest.approx(prompt_logprob_alone(tiny_llama, prompt), abs=1e-4)


def test_structured_output_for_the_job_and_per_row(local_ray, tmp_path, tiny_llama):
    """generation.json_schema for the job; json_schema and regex columns for some rows, which replace it.
    Each text is what its schema or regex allows (its tokens: test_structured); a schema or regex that
    cannot be followed, or both on one row, make that row an error row. output.parse_json adds the
    answers parsed, typed by the job's schema."""
    schema = {"type": "object", "properties": {"label": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
              "required": ["label", "sure"]}
    sentence = r"(yes|no), [0-9]{1,3} (apples|pears)\."
    regexes = [None, sentence, "(ab", None, None, "a"]
    schemas = [None, None, None, '{"type": "boolean"}', "{not json", '{"type": "boolean"}']
    path = write_prompts(tmp_path / "in.parquet", varied_prompts(6, seed=9, max_words=20), regex=regexes,
                         json_schema=schemas)
    out = tmp_path / "out"
    run(compose(f"input.path={path}", f"output.path={out}", f"model.path={tiny_llama}", "cluster.num_replicas=1",
                "generation.max_new_tokens=40", "input.param_columns=[regex,json_schema]",
                f"generation.json_schema='{json.dumps(schema)}'", "output.parse_json=true",
                "generation.logprobs=true", "generation.top_logprobs=2"))
    table = pq.read_table(out)
    assert table.schema.field("generated_json").type == pa.struct([("label", pa.string()), ("sure", pa.bool_())])
    rows = table.to_pylist()
    # generation.top_logprobs: the text's tokens, each with the model's two likeliest at its step (values: test_engine)
    for row in rows[:2] + rows[3:4]:
        tokens = row["token_logprobs"]
        assert "".join(t["token"] for t in tokens) == row["generated_text"]
        assert len(tokens) == row["num_generated_tokens"] - 1  # the EOS that ended it left out
        assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= t["top_logprobs"][0]["logprob"] for t in tokens)
        assert sum(t["logprob"] for t in tokens) == pytest.approx(row["logprob"], abs=1e-4)
    assert rows[2]["token_logprobs"] is None
    answer = json.loads(rows[0]["generated_text"])
    assert set(answer) == {"label", "sure"} and answer["label"] in ("yes", "no")
    # the job's schema types generated_json: a row held to another one's text does not fit it
    assert [r["generated_json"] for r in rows] == [answer] + [None] * 5
    assert re.fullmatch(sentence, rows[1]["generated_text"])
    assert rows[3]["generated_text"] in ("true", "false")
    assert [r["finish_reason"] for r in rows] == ["stop", "stop", "error", "stop", "error", "error"]
    assert rows[2]["error"].startswith("invalid parameter: the pattern '(ab' cannot be followed with this tokenizer")
    assert rows[4]["error"].startswith("invalid parameter: json_schema is not JSON")
    assert rows[5]["error"] == "invalid parameter: json_schema and regex both say what a text may be: set one"


def test_a_job_that_only_scores_and_embeds_its_prompts(local_ray, tmp_path, tiny_llama, capsys):
    """experiment=embed (max_new_tokens 0, embedding) with prompt_logprobs, mean pooling and 32 dimensions:
    every row's prompt scored and embedded (as the model alone does it), nothing generated; such rows are
    not counted as cut at the token limit."""
    from transformers import AutoModel

    prompts = varied_prompts(6, seed=10, max_words=40)
    out = tmp_path / "out"
    result = run(compose(f"input.path={write_prompts(tmp_path / 'in.parquet', prompts)}", f"output.path={out}",
                         f"model.path={tiny_llama}", "cluster.num_replicas=1", "experiment=embed",  # max_new_tokens 0
                         "generation.prompt_logprobs=true", "generation.embedding=mean",
                         "generation.embedding_dimensions=32"))
    table = pq.read_table(out)
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert {(r["generated_text"], r["num_generated_tokens"], r["finish_reason"]) for r in rows} == {("", 0, "length")}
    base, tokenizer = AutoModel.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    for row, prompt in zip(rows, prompts):
        assert row["prompt_logprob"] == pytest.approx(prompt_logprob_alone(tiny_llama, prompt), abs=1e-4)
        with torch.inference_mode():
            expected = base(**tokenizer(prompt, return_tensors="pt")).last_hidden_state[0].mean(0)[:32]
        assert row["embedding"] == pytest.approx((expected / expected.norm()).tolist(), abs=1e-5)
    # as docs/prompts-and-settings.md compares them in SQL: a vector's cosine similarity with itself is 1
    import duckdb
    similar = duckdb.connect().execute(f"SELECT min(list_cosine_similarity(a.embedding, b.embedding)) FROM "
                                       f"read_parquet('{out}/*.parquet') a JOIN read_parquet('{out}/*.parquet') b "
                                       "USING (id)").fetchone()[0]
    assert similar == pytest.approx(1.0, abs=1e-5)
    said = capsys.readouterr().out
    assert result["metrics"]["rows_cut_at_token_limit"] == 0 and "cut at token limit" not in said
    assert " rows/s | 0 errors" in said and "gen tok/s |" not in said  # the pace in rows, on the progress line
    assert re.search(r"replica \S+ +6 rows, [\d.]+ rows/s", said), said  # and each replica's in the summary
    assert "generated tokens/s" not in said and "decode slot efficiency" not in said  # which it has none of


def test_an_encoder_embeds_through_the_job_as_sentence_transformers_does(local_ray, tmp_path):
    """The built-in BERT-style encoder (model=tiny_bert) through the whole job, with cls pooling and texts cut
    at 64 tokens (input.max_prompt_tokens, truncate_end): every vector is the one sentence-transformers'
    encode() gives, which cuts at its max_seq_length the same way ([CLS], the start, [SEP]); a row asking the
    encoder to generate is an error row."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from lmbatch.models import resolve_model_path

    prompts = varied_prompts(8, seed=11, max_words=120)
    out = tmp_path / "out"
    source = write_prompts(tmp_path / "in.parquet", prompts, max_new_tokens=pa.array([None] * 7 + [4], pa.int64()))
    run(compose(f"input.path={source}", f"output.path={out}", "model=tiny_bert", "experiment=embed",
                "generation.embedding=cls", "input.max_prompt_tokens=64", "input.on_too_long=truncate_end",
                "input.param_columns=[max_new_tokens]", "cluster.num_replicas=1"))
    rows = pq.read_table(out).to_pylist()
    assert rows[7]["error"] == ("invalid parameter: max_new_tokens must be 0: the model (BertModel) is an encoder, "
                                "which reads text both ways, and cannot generate")
    path = resolve_model_path("builtin://tiny-bert")
    st = SentenceTransformer(modules=[Transformer(path, max_seq_length=64), Pooling(64, pooling_mode="cls"),
                                      Normalize()], device="cpu")
    expected = st.encode(prompts[:7])
    assert max(r["num_prompt_tokens"] for r in rows[:7]) > 64  # some were cut
    for row, vector in zip(rows, expected):
        assert row["error"] is None and row["embedding"] == pytest.approx(vector.tolist(), abs=1e-5), row["id"]


def test_a_classification_job_reads_pairs(local_ray, tmp_path, tiny_bert):
    """generation.classify through the whole job with a BERT classifier of pairs (NLI: a premise, and a
    hypothesis in input.pair_column): each row's label and label scores are what transformers'
    text-classification pipeline gives its pair alone; a row without a hypothesis is an error row; DuckDB
    filters on the labels as docs/prompts-and-settings.md shows."""
    import duckdb
    from transformers import pipeline

    labels = ["contradiction", "neutral", "entailment"]
    classifier = save_classifier(tiny_bert, tmp_path / "classifier", labels)
    premises, hypotheses = varied_prompts(7, seed=12, max_words=60), varied_prompts(6, seed=13, max_words=12)
    out = tmp_path / "out"
    source = write_prompts(tmp_path / "in.parquet", premises, hypothesis=[*hypotheses, None])
    run(compose(f"input.path={source}", f"output.path={out}", "input.pair_column=hypothesis",
                f"model.path={classifier}", "experiment=classify", "cluster.num_replicas=1"))
    rows = pq.read_table(out).sort_by("id").to_pylist()
    assert pq.read_schema(next(out.glob("*.parquet"))).field("label_scores").type == pa.list_(pa.float32())
    assert rows[6]["error"] == "null pair: column 'hypothesis' is null" and rows[6]["label"] is None
    pairs = [{"text": p, "text_pair": h} for p, h in zip(premises, hypotheses)]
    expected = pipeline("text-classification", model=classifier, top_k=None, device="cpu")(pairs)
    for row, scores in zip(rows, expected):
        by_label = {d["label"]: d["score"] for d in scores}
        assert row["label"] == scores[0]["label"] and row["generated_text"] == "" and row["error"] is None
        assert row["label_scores"] == pytest.approx([by_label[name] for name in labels], abs=1e-5)
    entailed = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{out}/*.parquet') "
                                        "WHERE label = 'entailment' AND label_scores[3] > 0.3").fetchone()[0]
    assert entailed == sum(s[0]["label"] == "entailment" and s[0]["score"] > 0.3 for s in expected)


def test_a_lora_adapter_job(local_ray, tmp_path, tiny_llama, lora_adapter):
    """model.adapter through the whole job: each text is that of the base model with the adapter
    (loaded by transformers, unmerged) on the prompt alone; the manifest names the adapter."""
    prompts = varied_prompts(6, seed=8, max_words=30)
    out = tmp_path / "out"
    run(compose(f"input.path={write_prompts(tmp_path / 'in.parquet', prompts)}", f"output.path={out}",
                f"model.path={tiny_llama}", f"model.adapter={lora_adapter}", "generation.max_new_tokens=6",
                "cluster.num_replicas=1"))
    for row, prompt in zip(pq.read_table(out).to_pylist(), prompts):
        assert row["generated_text"] == adapted_oracle(tiny_llama, lora_adapter, prompt, 6), row["id"]
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["config"]["model"]["adapter"] == lora_adapter
    assert "with adapter content" in manifest["model_identity"]


def adapted_oracle(model_path, adapter, prompt, max_new_tokens):
    """The greedy text of the model with the adapter loaded by transformers (unmerged), or without one."""
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    if adapter:
        model.load_adapter(adapter)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0]
    new = new[ids.shape[1]:].tolist()
    new = new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new
    return tokenizer.decode(new, skip_special_tokens=True)


def test_rows_choose_their_adapter(local_ray, tmp_path, tiny_llama, lora_adapter):
    """model.adapters with an adapter column (input.param_columns): each row is generated by the adapter it
    names, by the job's (generation.adapter) for a null cell, or by the model alone for "", as transformers
    applies it to the prompt alone; a name not in model.adapters makes that row an error row."""
    second = str(save_lora_adapter(tiny_llama, tmp_path / "second", seed=1))
    adapters = {None: lora_adapter, "first": lora_adapter, "second": second, "": None}
    prompts = varied_prompts(7, seed=8, max_words=30)
    names = [None, "first", "second", "", "", "second", "third"]
    out = tmp_path / "out"
    run(compose(f"input.path={write_prompts(tmp_path / 'in.parquet', prompts, adapter=names)}", f"output.path={out}",
                f"model.path={tiny_llama}", f"+model.adapters.first={lora_adapter}", f"+model.adapters.second={second}",
                "generation.adapter=first", "input.param_columns=[adapter]", "generation.max_new_tokens=6",
                "cluster.num_replicas=1"))
    rows = pq.read_table(out).to_pylist()
    for row, prompt, name in zip(rows[:6], prompts, names):
        assert row["generated_text"] == adapted_oracle(tiny_llama, adapters[name], prompt, 6), row["id"]
    assert rows[6]["error"] == "invalid parameter: adapter 'third' is not one of model.adapters (first, second)"


def chat_oracle(model_path, messages, max_new_tokens):
    tok = AutoTokenizer.from_pretrained(model_path)
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return oracle(model_path, text, max_new_tokens, add_special_tokens=False)


def test_chat_messages_and_system_prompt_use_the_chat_template(local_ray, tmp_path, tiny_llama):
    chats = [
        [{"role": "user", "content": "Explain the data table"}],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
         {"role": "user", "content": "summarize the report"}],
        [],  # no messages: an error row
        [{"role": "system", "content": "You are wordy."}, {"role": "user", "content": "hello"}],  # keeps its own
    ]
    path = tmp_path / "chats.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "messages": chats}), path)
    out = tmp_path / "out"
    run(compose(f"input.path={path}", f"output.path={out}", f"model.path={tiny_llama}", "input.messages_column=messages",
                "input.system_prompt=You are terse.", "generation.max_new_tokens=8", "cluster.num_replicas=1"))
    rows = pq.read_table(out).to_pylist()
    system = [{"role": "system", "content": "You are terse."}]
    for row, chat in zip(rows[:2], chats):
        assert row["generated_text"] == chat_oracle(tiny_llama, system + chat, 8)
    assert rows[2]["error"].startswith("empty prompt")
    assert rows[3]["generated_text"] == chat_oracle(tiny_llama, chats[3], 8)

    plain = write_prompts(tmp_path / "plain.parquet", ["Explain the data table"])
    run(compose(f"input.path={plain}", f"output.path={tmp_path / 'plain'}", f"model.path={tiny_llama}",
                "input.apply_chat_template=true", "generation.max_new_tokens=8", "cluster.num_replicas=1"))
    row = pq.read_table(tmp_path / "plain").to_pylist()[0]
    assert row["generated_text"] == chat_oracle(tiny_llama, chats[0], 8)

    # OpenAI-style content parts, as datasets made for multimodal models hold even for text
    parted = [[{"role": "user", "content": [{"type": "text", "text": "Explain the data"},
                                            {"type": "text", "text": "table"}]}],
              [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]]
    path = tmp_path / "parts.parquet"
    pq.write_table(pa.table({"id": [1, 2], "messages": parted}), path)
    run(compose(f"input.path={path}", f"output.path={tmp_path / 'parts'}", f"model.path={tiny_llama}",
                "input.messages_column=messages", "generation.max_new_tokens=8", "cluster.num_replicas=1"))
    rows = pq.read_table(tmp_path / "parts").to_pylist()
    assert rows[0]["generated_text"] == chat_oracle(tiny_llama, [{"role": "user", "content": "Explain the data\ntable"}], 8)
    assert rows[1]["error"].startswith("bad messages: column 'messages' needs a list of {role, content}, the content "
                                       "a string or a list of text parts")
