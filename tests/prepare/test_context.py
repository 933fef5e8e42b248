"""Fitting prompts into the model's context: cut from the left or at the end, a chat's oldest turns
dropped, a pair cut at the end of its second text.
"""


import shutil

import pyarrow as pa
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from helpers.config import compose
from helpers.data import write_prompts
from lmbatch.config import ConfigError
from lmbatch.models import build_tokenizer
from lmbatch.models.tokens import load_tokenizer
from lmbatch.plan.job import plan_job, to_job_config
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import ERROR, PROMPT_IDS, SECOND_TEXT


def test_truncation_keeps_the_bos_a_tokenizer_puts_first(tmp_path, tiny_llama):
    """Llama, Mistral and Gemma tokenizers start every prompt with BOS: cutting from the left took
    it away, and such a model drifts without it. The cut now comes after the leading special tokens."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = build_tokenizer()  # the tiny model's own vocabulary, now adding <s> first
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)])
    tokenizer.save_pretrained(model)
    source = write_prompts(tmp_path / "in.parquet", ["word " * 3000, "short"])
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={model}", "input.on_too_long=truncate",
                                          "generation.max_new_tokens=4")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    whole = load_tokenizer(str(model))("word " * 3000)["input_ids"]
    cut, short = rows[PROMPT_IDS].to_pylist()
    assert whole[0] == tokenizer.bos_token_id and len(whole) > 2048 and rows[ERROR].to_pylist() == [None, None]
    assert cut == [tokenizer.bos_token_id] + whole[-(2048 - 4 - 1):]  # context 2048, 4 new tokens
    assert short[0] == tokenizer.bos_token_id and rows["num_prompt_tokens"].to_pylist()[0] == len(whole)


def test_truncating_the_end_keeps_the_start_and_the_eos_a_tokenizer_puts_last(tmp_path, tiny_llama):
    """input.on_too_long=truncate_end, for embedding long texts as embedding models are trained to read
    them: the start of the prompt, and the special tokens its tokenizer ends it with (the EOS whose hidden
    state a last-token embedding is), with the BOS it begins with; refused for chats, whose end is the turn
    the model answers. input.max_prompt_tokens caps prompts below the context the same way."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    tokenizer = build_tokenizer()  # the tiny model's own vocabulary, now with <s> first and </s> last
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tokenizer.bos_token_id), ("</s>", tokenizer.eos_token_id)])
    tokenizer.save_pretrained(model)
    source = write_prompts(tmp_path / "in.parquet", [" ".join(f"w{i}" for i in range(3000)), "short"])

    def prepared(*overrides):
        plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                              f"model.path={model}", *overrides)))
        return pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    whole = load_tokenizer(str(model))(" ".join(f"w{i}" for i in range(3000)))["input_ids"]
    assert (whole[0], whole[-1]) == (tokenizer.bos_token_id, tokenizer.eos_token_id) and len(whole) > 2048
    rows = prepared("input.on_too_long=truncate_end", "generation.max_new_tokens=0", "generation.embedding=last")
    cut, short = rows[PROMPT_IDS].to_pylist()
    assert cut == whole[:2048 - 1] + [tokenizer.eos_token_id] and rows[ERROR].to_pylist() == [None, None]
    assert short[-1] == tokenizer.eos_token_id and rows["num_prompt_tokens"].to_pylist()[0] == len(whole)
    cut = prepared("input.on_too_long=truncate", "generation.max_new_tokens=4")[PROMPT_IDS].to_pylist()[0]
    assert cut == [tokenizer.bos_token_id] + whole[-(2048 - 4 - 1):]  # truncate: the BOS and the end, as before
    # input.max_prompt_tokens: a cap below the context, cut to as on_too_long says, or an error row
    rows = prepared("input.max_prompt_tokens=100", "input.on_too_long=truncate_end", "generation.max_new_tokens=0",
                    "generation.embedding=last")
    assert rows[PROMPT_IDS].to_pylist() == [whole[:99] + [tokenizer.eos_token_id], short]
    rows = prepared("input.max_prompt_tokens=100")
    assert rows[ERROR].to_pylist() == [f"too long: prompt has {len(whole)} tokens; it exceeds input.max_prompt_tokens="
                                       "100 (input.on_too_long=truncate keeps the end, truncate_end the start)", None]
    with pytest.raises(ConfigError, match="input.on_too_long=truncate_end would cut off the end of a chat"):
        prepared("input.on_too_long=truncate_end", "input.apply_chat_template=true")


def test_truncating_a_chat_drops_its_oldest_turns_and_keeps_the_system_message(tmp_path, tiny_llama):
    """Cutting a rendered chat from the left took its system message and opening away, and left the
    model a conversation that began mid-sentence. Whole turns go now, oldest first, a user turn first."""
    system = {"role": "system", "content": "Be brief."}
    old = [{"role": "user", "content": "word " * 500}, {"role": "assistant", "content": "ok"}]
    recent = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "fine"},
              {"role": "user", "content": "What now?"}]
    # and a long conversation: 41 turns of different lengths, about 3,000 tokens in all
    turns = [{"role": ("user", "assistant")[i % 2], "content": "word " * (40 + i * 37 % 60)} for i in range(41)]
    chats = [[system, *old, *recent], [{"role": "user", "content": "word " * 3000}], [system, *recent],
             [system, *turns]]
    source = write_prompts(tmp_path / "in.parquet", ["x"] * 4, messages=chats)
    plan = plan_job(to_job_config(compose(f"input.path={source}", f"output.path={tmp_path / 'out'}",
                                          f"model.path={tiny_llama}", "input.messages_column=messages",
                                          "input.on_too_long=truncate", "generation.max_new_tokens=4")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    tokenizer = load_tokenizer(tiny_llama)

    def ids(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert rows[ERROR].to_pylist() == [None] * 4
    dropped, alone, short, long = rows[PROMPT_IDS].to_pylist()
    assert len(ids(chats[0])) > 2048 - 4 >= len(ids([system, *recent]))
    assert dropped == ids([system, *recent]) == short
    # One turn too long on its own is cut like a plain prompt, after its leading special tokens.
    whole = ids(chats[1])
    assert alone == whole[:1] + whole[-(2048 - 4 - 1):] and tokenizer.convert_ids_to_tokens(alone[0]) == "<|user|>"
    assert rows["num_prompt_tokens"].to_pylist()[:3] == [len(ids(chats[0])), len(whole), len(short)]
    # The long one keeps its turns from the first user turn where they fit on.
    first = next(k for k in range(1, 41) if turns[k]["role"] == "user" and len(ids([system, *turns[k:]])) <= 2048 - 4)
    assert first > 2 and long == ids([system, *turns[first:]])


def test_a_pair_is_tokenized_as_the_tokenizer_joins_one_and_cut_at_its_second_texts_end(tmp_path, tiny_bert):
    """input.pair_column: each prompt and its row's second text are one pair, as the tokenizer joins it
    ([CLS] query [SEP] passage [SEP]); with on_too_long=truncate_end a long pair keeps the query whole and
    loses the end of the passage, as the tokenizer's only_second truncation cuts it, and a query that leaves no
    room for the passage is an error row (the tokenizer refuses it); so is a null or empty second text. Where the
    passage begins is noted for the token types, a [SEP] typed into the query being the query's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    queries = ["what is a cat", "why", "how", "who", "what " * 29, "what " * 28, "what [SEP] is a cat",
               "why [SEP] " + "what " * 28]
    passages = ["word " * 100, "because", None, "  ", "b", "b", "word " * 100, "b"]
    source = write_prompts(tmp_path / "in.parquet", queries, passage=passages)
    plan = plan_job(to_job_config(compose(
        f"input.path={source}", f"output.path={tmp_path / 'out'}", f"model.path={tiny_bert}", "experiment=embed",
        "generation.embedding=cls", "input.pair_column=passage", "input.max_prompt_tokens=32",
        "input.on_too_long=truncate_end")))
    rows = pa.concat_tables(prepare_chunk(chunk, plan.settings) for chunk in plan.chunks)
    cut = {i: tokenizer(q, p, truncation="only_second", max_length=32)
           for i, (q, p) in enumerate(zip(queries, passages)) if i in (0, 1, 5, 6)}
    assert {i: rows[PROMPT_IDS][i].as_py() for i in cut} == {i: c["input_ids"] for i, c in cut.items()}
    assert {i: rows[SECOND_TEXT][i].as_py() for i in cut} == {i: c["token_type_ids"].index(1) for i, c in cut.items()}
    too_long = ("too long: pair has {} tokens; it exceeds input.max_prompt_tokens=32, and its first text takes {} of "
                "the 32 tokens it may have (input.on_too_long=truncate_end cuts the second text only)")
    assert rows[ERROR].to_pylist() == [None, None, "null pair: column 'passage' is null",
                                       "empty pair: column 'passage' is empty or whitespace", too_long.format(33, 31),
                                       None, None, too_long.format(34, 32)]
    with pytest.raises(Exception, match="Sequence to truncate too short"):  # as the tokenizer refuses it
        tokenizer(queries[4], "b b", truncation="only_second", max_length=32)
