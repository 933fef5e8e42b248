"""`dry_run=true`: validate, then show what the job would do, without loading a model or starting Ray."""

from __future__ import annotations

import math

from lmbatch.engine.batching import decode_steps, padding_efficiency
from lmbatch.engine.requests import identical_requests, padded_tokens, plan_requests, shared_prefix
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import ERROR, NUM_PROMPT_TOKENS
from lmbatch.replica.requests import chunk_requests
from lmbatch.prepare.tokens import load_tokenizer

SAMPLE_ROWS = 5000  # tokenizing every row of a huge input would be the job itself; a sample shows the shape
ERROR_EXAMPLES = 3
SHOWN_PROMPT_CHARS = 1500


def histogram(lengths: list[int]) -> list[tuple[str, int]]:
    """Counts per power-of-two bucket of token length: 1, 2-3, 4-7, ..."""
    counts: dict[int, int] = {}
    for n in lengths:
        b = int(math.log2(n)) if n > 0 else 0
        counts[b] = counts.get(b, 0) + 1
    return [(f"{2 ** b}-{2 ** (b + 1) - 1}", counts[b]) for b in sorted(counts)]


def _size(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def shown_prompt(text: str) -> str:
    """A prompt as printed: indented, and a long one cut in its middle (its start and its end, where a
    chat template puts the system turn and the generation prompt, are what a reader checks)."""
    half = SHOWN_PROMPT_CHARS // 2
    if len(text) > SHOWN_PROMPT_CHARS:
        text = f"{text[:half]}[... {len(text) - 2 * half:,} characters ...]{text[-half:]}"
    return "\n".join(f"  | {line}" for line in text.split("\n"))


def dry_run(plan) -> dict:
    b = plan.job.batching
    s = plan.settings
    id_column = s.passthrough_columns[0]
    lengths, errors, repeats, batches, steps, rows_seen = [], 0, 0, 0, 0, 0
    real = padded = largest = shared = sequence_tokens = 0
    first_prompt, error_examples = None, []
    for chunk in plan.pending:
        if rows_seen >= SAMPLE_ROWS:
            break
        table = prepare_chunk(chunk, s, plan.error_duplicates(chunk.id))
        requests = chunk_requests(table, plan.job.generation, id_column)
        errors += table.num_rows - len(requests)
        if requests and first_prompt is None:
            first_prompt = (table[id_column][requests[0].key].as_py(), requests[0])
        examples = [(row_id, e) for row_id, e in zip(table[id_column].to_pylist(), table[ERROR].to_pylist()) if e]
        error_examples += examples[:ERROR_EXAMPLES - len(error_examples)]
        true_lengths = table[NUM_PROMPT_TOKENS].to_pylist()
        lengths += [true_lengths[r.key] for r in requests]
        # planned as replicas plan: a repeat of a row is not generated, and rows with different
        # sampling settings never share a micro-batch
        requests, repeated = identical_requests(requests)
        repeats += sum(map(len, repeated.values()))
        chunk_lengths = [len(r.prompt_ids) for r in requests]
        new_tokens = [r.max_new_tokens for r in requests]
        plan_ = plan_requests(b, requests)
        batches += len(plan_)
        steps += decode_steps(plan_, new_tokens)
        largest = max([largest] + [padded_tokens([requests[i] for i in batch]) for batch in plan_])
        real += sum(chunk_lengths)
        padded += sum(chunk_lengths) / padding_efficiency(plan_, chunk_lengths) if plan_ else 0
        for batch in plan_ if b.share_prefix else ():
            rows = [requests[i] for i in batch]
            shared += shared_prefix(rows) * (sum(r.params.num_return_sequences for r in rows) - 1)
            sequence_tokens += sum(len(r.prompt_ids) * r.params.num_return_sequences for r in rows)
        rows_seen += chunk.num_rows

    print(f"lmbatch dry run: {plan.inputs.num_rows:,} rows in {len(plan.inputs.files)} files, "
          f"{len(plan.chunks)} chunks of <= {plan.chunk_rows} rows, {len(plan.pending)} to generate")
    print(f"sampled {rows_seen:,} rows: {errors} would be error rows, {repeats} repeat an earlier row's prompt and "
          f"greedy settings (copied, not generated); {plan.num_duplicate_rows} rows in the input repeat an earlier id")
    for row_id, error in error_examples:
        print(f"  error row {id_column}={row_id!r}: {error}")
    if plan.job.output.too_many_errors(rows_seen, errors):
        print(f"warning: {errors / rows_seen:.1%} of the sampled rows would be error rows, over "
              f"output.max_error_fraction={plan.job.output.max_error_fraction}: the job would stop")
    if first_prompt:  # exactly what the model is given: template, chat template and special tokens shown
        row_id, request = first_prompt
        tokenizer = load_tokenizer(s.tokenizer_path, s.trust_remote_code, s.tokenizer_class, s.tokenizer_revision)
        print(f"the first row's prompt as the model is given it ({id_column}={row_id!r}, {len(request.prompt_ids)} "
              "tokens, special tokens shown):")
        print(shown_prompt(tokenizer.decode(request.prompt_ids, skip_special_tokens=False)))
        if request.choices:  # how a label is written decides its tokens (" positive" or "positive")
            print("its choices as the model's tokens: " + "; ".join(
                f"{text!r} = {' + '.join(repr(tokenizer.decode([t])) for t in ids)}" for text, ids in request.choices))
        if request.pattern:  # what a json_schema becomes: what the text will match, whitespace and all
            shown, more = request.pattern[:400], len(request.pattern) - 400
            print(f"its text is held to the regular expression {shown}"
                  + (f"... ({more:,} characters more)" if more > 0 else ""))
    print("prompt tokens   rows")
    peak = max((c for _, c in histogram(lengths)), default=1)
    for label, count in histogram(lengths):
        print(f"  {label:>11}  {count:>6}  {'#' * max(1, round(40 * count / peak))}")
    efficiency = real / padded if padded else 1.0
    print(f"planned micro-batches ({b.strategy}): {batches} for the sampled rows, "
          f"{rows_seen / max(batches, 1):.1f} rows each on average, prefill padding efficiency {efficiency:.3f}")
    if shared:  # a template whose instructions come first is computed once per micro-batch
        print(f"prompt tokens shared within the planned micro-batches, computed once for each: {shared:,} of "
              f"the {sequence_tokens:,} their sequences hold ({shared / sequence_tokens:.0%}; batching.share_prefix)")
    kv = plan.kv_bytes_per_token
    if batches and not steps:  # max_new_tokens 0: no decode steps, and no KV cache kept
        print("nothing is generated: each micro-batch is one forward pass over its prompts, which are only "
              "embedded, scored or classified")
    else:  # on a GPU a decode step costs about the same for one row as for hundreds: steps are the cost
        print(f"planned decode steps for the sampled rows: at most {steps:,} "
              "(a micro-batch runs to its largest max_new_tokens)")
    if kv and largest and steps:  # what a GPU must hold for a micro-batch besides the weights: sizes max_batch_tokens
        print(f"KV cache of the largest planned micro-batch: {largest:,} tokens x {kv:,} bytes "
              f"({plan.job.replica_dtype}) = {_size(largest * kv)} (batching.max_batch_tokens="
              f"{b.max_batch_tokens:,} allows {_size(b.max_batch_tokens * kv)})")
    print("no model was loaded for generation and nothing was written")
    return {"output": plan.output.uri, "dry_run": True, "sampled_rows": rows_seen, "error_rows": errors,
            "repeated_rows": repeats,
            "micro_batches": batches, "decode_steps": steps, "padding_efficiency": efficiency,
            "prompt_tokens_shared": shared,
            "largest_micro_batch_tokens": largest, "kv_cache_bytes_per_token": kv,
            "histogram": histogram(lengths), "error_examples": error_examples}
