"""The correctness oracles: transformers on each prompt alone."""

from __future__ import annotations


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
