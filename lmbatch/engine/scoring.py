"""Log-probabilities that take forward passes of their own besides generation, on the left-padded
prompts of a micro-batch: each prompt's (generation.prompt_logprobs), and each choice's given its
prompt (generation.logprobs with choices of more than one token)."""

from __future__ import annotations

import copy
import inspect

import torch

from lmbatch.engine.types import Request

SCORING_LOGITS = 2 ** 27
"""Logits (rows x choice tokens x vocabulary) one forward pass of choice scoring may return: rows are
scored in groups under it (0.5 GB as float32), as a micro-batch of 1,024 rows could otherwise need many GB."""


def cache_keyword(model) -> str:
    """What the model's forward and generate call their cache: renamed in transformers 5.x."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def left_padded_positions(mask):
    """Position ids of left-padded prompts, as each has them alone: counted from its first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def score_prompts(model, batch: list[Request], input_ids, attention_mask) -> dict[int, float]:
    """Each prompt's log-probability (by request key), every token given those before it, from forward
    passes over the left-padded prompts, in groups whose logits stay under SCORING_LOGITS."""
    device = model.device
    group = max(1, SCORING_LOGITS // (input_ids.shape[1] * model.config.get_text_config().vocab_size))
    sums: list[float] = []
    for start in range(0, len(batch), group):
        ids, mask = input_ids[start:start + group].to(device), attention_mask[start:start + group].to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                           use_cache=False).logits
            each = logits[:, :-1].float().log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
            # position j predicts token j + 1; padding is on the left, so a real j has a real j + 1
            sums += torch.where(mask[:, :-1] == 1, each, 0.0).sum(-1).tolist()
    return {r.key: s for r, s in zip(batch, sums)}


def score_choices(model, pad_id: int, batch: list[Request], input_ids, attention_mask) -> dict[int, list[float]]:
    """Each choice's log-probability given its row's prompt (by request key), as one forward pass
    over prompt and choice gives it. The prompts run once; then, for each choice index, the
    choices' tokens run on a copy of the prompts' KV cache (choices are short, prompts may not be)."""
    device = model.device
    parameters = inspect.signature(model.forward).parameters
    cache = cache_keyword(model)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    rows = [i for i, r in enumerate(batch) if r.choices]
    longest = max(len(ids) for i in rows for _, ids in batch[i].choices)
    group = max(1, SCORING_LOGITS // (longest * model.config.get_text_config().vocab_size))
    scores = {}
    for start in range(0, len(rows), group):
        part = rows[start:start + group]
        choices = [[ids for _, ids in batch[i].choices] for i in part]
        ids, mask = input_ids[part].to(device), attention_mask[part].to(device)
        positions = mask.sum(-1, keepdim=True) + torch.arange(longest, device=device)
        table = torch.zeros((len(part), max(map(len, choices))), device=device)
        with torch.inference_mode():
            prefill = model(input_ids=ids, attention_mask=mask, position_ids=left_padded_positions(mask),
                            use_cache=True, **last_only)
            first = prefill.logits[:, -1].float().log_softmax(-1)
            for j in range(table.shape[1]):  # the j-th choice of every row (padding where a row has fewer)
                tokens = torch.full((len(part), longest), pad_id, dtype=torch.long)
                for k, cs in enumerate(choices):
                    if j < len(cs):
                        tokens[k, :len(cs[j])] = torch.tensor(cs[j])
                length = torch.tensor([len(cs[j]) if j < len(cs) else 0 for cs in choices])
                seen = (torch.arange(longest) < length[:, None]).long().to(device)
                tokens = tokens.to(device)
                out = model(input_ids=tokens, attention_mask=torch.cat([mask, seen], 1), position_ids=positions,
                            use_cache=True, **{cache: copy.deepcopy(getattr(prefill, cache))})
                table[:, j] = first.gather(1, tokens[:, :1]).squeeze(1)
                for t in range(1, longest):  # position t-1 predicts token t: one position at a time
                    following = out.logits[:, t - 1].float().log_softmax(-1).gather(1, tokens[:, t:t + 1])
                    table[:, j] += torch.where(seen[:, t] == 1, following.squeeze(1), 0.0)
        for i, cs, row in zip(part, choices, table.tolist()):
            scores[batch[i].key] = row[:len(cs)]
    return scores
