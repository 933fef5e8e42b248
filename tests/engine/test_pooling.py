"""Embeddings and classification in the hf engine, as transformers and sentence-transformers give them
for each prompt alone.
"""


import pyarrow as pa
import pytest
import torch

from helpers.data import varied_prompts
from helpers.engines import make_engine
from helpers.models import save_classifier, save_headless
from lmbatch.engine.types import Pooling, Request, SamplingParams


def embedding_alone(base, ids, pooling: Pooling) -> torch.Tensor:
    """The oracle: transformers' model without its LM head (AutoModel) on this prompt alone, pooled."""
    with torch.inference_mode():
        hidden = base(torch.tensor([ids])).last_hidden_state[0]
    vector = (hidden[-1] if pooling.kind == "last" else hidden.mean(0))[:pooling.dimensions]
    return vector / vector.norm() if pooling.normalize else vector


@pytest.mark.parametrize("pooling, max_new", [(Pooling("last"), 3), (Pooling("mean", 16, normalize=False), 0)])
def test_embeddings_are_the_models_for_each_prompt_alone(model_path, pooling, max_new):
    """generation.embedding: each row's embedding is what transformers' AutoModel (the model without its LM
    head, loaded on its own) gives its prompt alone, pooled, cut to its dimensions and normalized, whatever
    the left padding of its micro-batch (prompts of 1 to hundreds of tokens); both samples of a row carry
    it; with max_new_tokens 0 nothing is generated (and no shared start is computed apart)."""
    from transformers import AutoModel

    engine = make_engine(model_path, max_batch_tokens=4096)
    params = SamplingParams(do_sample=True, num_return_sequences=2, embedding=pooling)
    prompts = [list(range(3, 23)) + engine.tokenizer(p)["input_ids"] for p in varied_prompts(15, seed=3)] + [[5]]
    requests = [Request(i, ids, max_new, params, seed=i) for i, ids in enumerate(prompts)]
    got = engine.generate(requests)
    assert len(got) == 32 and engine.stats.micro_batches > 1
    assert (engine.stats.decode_steps > 0) == (engine.stats.shared_prefix_tokens > 0) == (max_new > 0)
    base = AutoModel.from_pretrained(model_path)
    for c in got:
        expected = embedding_alone(base, requests[c.key].prompt_ids, pooling)
        assert c.embedding.type == pa.float32() and len(c.embedding) == (pooling.dimensions or 64)
        assert torch.allclose(torch.tensor(c.embedding.to_numpy()), expected, rtol=1e-4, atol=1e-5), c.key


def test_an_embedding_model_saved_without_its_lm_head_embeds(tiny_llama, tmp_path):
    """Embedding models are often saved as the model alone (Qwen3Model, not Qwen3ForCausalLM): the engine
    loads such a checkpoint (its LM head left as transformers initializes it) and embeds as from the whole."""
    params = SamplingParams(embedding=Pooling("last"))
    requests = [Request(i, [3 + i, 9, 4 * i + 1], 0, params) for i in range(4)]
    whole, alone_ = (make_engine(path).generate(requests) for path in (tiny_llama, save_headless(tiny_llama, tmp_path)))
    assert [c.embedding.to_pylist() for c in whole] == [c.embedding.to_pylist() for c in alone_]


@pytest.mark.parametrize("encoder", ["tiny_bert", "tiny_roberta"])
def test_an_encoder_embeds_each_prompt_as_sentence_transformers_does(encoder, request):
    """An encoder (BERT, RoBERTa: it reads both ways) embeds each prompt as sentence-transformers' encode()
    does it alone, with cls and mean pooling, though the job's micro-batches pad it on the left (fixed
    batches in input order: prompts of 1 to 100 words side by side); a row asking it to generate is an
    error row, and the others are embedded all the same. A separator typed into a text is read as the
    token, and BERT's text stays of token type 0 after it."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    path = request.getfixturevalue(encoder)
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    texts = varied_prompts(24, seed=4, max_words=100)
    texts[5] = f"a {engine.tokenizer.sep_token} typed into a text stays in it"
    for mode in ("cls", "mean"):
        params = SamplingParams(embedding=Pooling(mode))
        requests = [Request(i, engine.tokenizer(t)["input_ids"], 0, params) for i, t in enumerate(texts)]
        got = {c.key: c for c in engine.generate(requests + [Request(99, requests[0].prompt_ids, 3, params)])}
        assert got.pop(99).error.startswith("invalid parameter: max_new_tokens must be 0: the model (")
        assert {(c.text, c.finish_reason, c.error) for c in got.values()} == {("", "length", None)}
        st = SentenceTransformer(modules=[Transformer(path), STPooling(64, pooling_mode=mode), Normalize()],
                                 device="cpu")
        expected = st.encode(texts, convert_to_tensor=True)
        vectors = torch.stack([torch.tensor(got[i].embedding.to_numpy()) for i in range(len(texts))])
        assert torch.allclose(vectors, expected, rtol=1e-4, atol=1e-5), mode


@pytest.mark.parametrize("base, labels, problem_type", [
    ("tiny_bert", ["negative", "neutral", "positive"], None),  # softmax over the labels
    ("tiny_bert", ["quality"], "regression"),  # the raw score (FineWeb-Edu's classifier is one)
    ("tiny_llama", ["rejected", "chosen"], "multi_label_classification"),  # a decoder's head; a sigmoid each
])
def test_a_classifier_labels_each_prompt_as_the_transformers_pipeline_does(base, labels, problem_type, request,
                                                                           tmp_path):
    """generation.classify: each row's label and label scores are what transformers' text-classification
    pipeline gives its prompt alone (top_k=None: every label's score), for an encoder's head and a
    decoder's, single-label, regression and multi-label, though the job's micro-batches pad it (fixed batches
    in input order); a row asking a classifier to generate is an error row."""
    from transformers import pipeline

    path = save_classifier(request.getfixturevalue(base), tmp_path, labels, problem_type)
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    texts = varied_prompts(20, seed=6, max_words=100)
    params = SamplingParams(classify=True)
    requests = [Request(i, engine.tokenizer(t)["input_ids"], 0, params) for i, t in enumerate(texts)]
    got = {c.key: c for c in engine.generate(requests + [Request(99, requests[0].prompt_ids, 2, params)])}
    name = type(engine.model).__name__
    assert got.pop(99).error == f"invalid parameter: max_new_tokens must be 0: the model ({name}) is a classifier, " \
                                "and cannot generate"
    classifier = pipeline("text-classification", model=path, top_k=None, device="cpu")
    for i, text in enumerate(texts):
        expected = {d["label"]: d["score"] for d in classifier([text])[0]}
        assert got[i].label == max(expected, key=expected.get), i
        assert got[i].label_scores.to_pylist() == pytest.approx([expected[name] for name in labels], rel=1e-4,
                                                                abs=1e-5), i


def test_a_cross_encoder_scores_each_pair_as_sentence_transformers_does(tiny_bert, tmp_path):
    """input.pair_column: a cross-encoder (a BERT head of one output: a reranker's relevance) reads each query and
    passage joined as its tokenizer joins a pair, the passage of token type 1, and scores it as sentence-transformers'
    CrossEncoder.predict does the pair alone, though the job's micro-batches pad it (fixed batches in input order).
    A [SEP] typed into a query is read as the token, and the query's type stays 0 after it, as the tokenizer gives."""
    from sentence_transformers import CrossEncoder

    from lmbatch.models.tokens import encode_pairs

    path = save_classifier(tiny_bert, tmp_path, ["relevance"])
    engine = make_engine(path, strategy="fixed", fixed_batch_size=8)
    assert engine.encoder.token_types
    queries, passages = varied_prompts(20, seed=8, max_words=12), varied_prompts(20, seed=9, max_words=100)
    queries[1::3] = [q.replace(" ", " [SEP] ", 1) for q in queries[1::3]]
    pairs = list(zip(queries, passages))
    params = SamplingParams(classify=True)
    requests = [Request(i, ids, 0, params, second_text_start=start)
                for i, (ids, start) in enumerate(encode_pairs(engine.tokenizer, pairs, frozenset()))]
    alone = engine.tokenizer(*pairs[1])
    assert requests[1].prompt_ids == alone["input_ids"] and alone["input_ids"].count(engine.tokenizer.sep_token_id) == 3
    assert alone["token_type_ids"].index(1) == requests[1].second_text_start
    scores = [c.label_scores.to_pylist()[0] for c in engine.generate(requests)]
    expected = CrossEncoder(path, device="cpu").predict(pairs)
    assert scores == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
