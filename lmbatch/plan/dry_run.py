"""`dry_run=true`: validate, then show what the job would do, without loading a model or starting Ray."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from lmbatch.engine.batching import decode_steps, padding_efficiency
from lmbatch.engine.requests import identical_requests, padded_tokens, plan_requests, shared_prefix
from lmbatch.models.tokens import load_tokenizer
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import ERROR, NUM_PROMPT_TOKENS
from lmbatch.replica.requests import chunk_requests

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


@dataclasses.dataclass
class Sample:
    """What the first SAMPLE_ROWS rows of a job would be, prepared and planned as replicas plan them."""
    rows: int = 0
    errors: int = 0
    error_examples: list = dataclasses.field(default_factory=list)
    repeats: int = 0
    """Rows a replica copies from an identical earlier row instead of generating them."""
    lengths: list = dataclasses.field(default_factory=list)
    """Each generated row's true prompt tokens."""
    first_prompt: Optional[tuple] = None
    """(id, Request) of the first row that would be generated."""
    micro_batches: int = 0
    decode_steps: int = 0
    real_tokens: int = 0
    padded_tokens: float = 0
    largest: int = 0
    """Padded tokens of the largest micro-batch."""
    shared: int = 0
    """Prompt tokens a shared prefix saves computing."""
    sequence_tokens: int = 0

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else 1.0


def dry_run(plan) -> dict:
    """Prepare and plan a sample of the job's rows as its replicas would, print what they would do, and
    generate nothing."""
    sample = sample_rows(plan)
    say_rows(plan, sample)
    if sample.first_prompt:
        say_first_prompt(plan, *sample.first_prompt)
    say_plan(plan, sample)
    print("no model was loaded for generation and nothing was written")
    return {"output": plan.output.uri, "dry_run": True, "sampled_rows": sample.rows, "error_rows": sample.errors,
            "repeated_rows": sample.repeats,
            "micro_batches": sample.micro_batches, "decode_steps": sample.decode_steps,
            "padding_efficiency": sample.padding_efficiency, "prompt_tokens_shared": sample.shared,
            "largest_micro_batch_tokens": sample.largest, "kv_cache_bytes_per_token": plan.kv_bytes_per_token,
            "histogram": histogram(sample.lengths), "error_examples": sample.error_examples}


def sample_rows(plan) -> Sample:
    """The pending chunks prepared and planned, chunk by chunk, until SAMPLE_ROWS rows are seen."""
    b, s = plan.job.batching, plan.settings
    id_column = s.passthrough_columns[0]
    found = Sample()
    for chunk in plan.pending:
        if found.rows >= SAMPLE_ROWS:
            break
        table = prepare_chunk(chunk, s, plan.error_duplicates(chunk.id))
        requests = chunk_requests(table, plan.job.generation, id_column)
        found.errors += table.num_rows - len(requests)
        if requests and found.first_prompt is None:
            found.first_prompt = (table[id_column][requests[0].key].as_py(), requests[0])
        examples = [(row_id, e) for row_id, e in zip(table[id_column].to_pylist(), table[ERROR].to_pylist()) if e]
        found.error_examples += examples[:ERROR_EXAMPLES - len(found.error_examples)]
        true_lengths = table[NUM_PROMPT_TOKENS].to_pylist()
        found.lengths += [true_lengths[r.key] for r in requests]
        # planned as replicas plan: a repeat of a row is not generated, and rows with different
        # sampling settings never share a micro-batch
        requests, repeated = identical_requests(requests)
        found.repeats += sum(map(len, repeated.values()))
        chunk_lengths = [len(r.prompt_ids) for r in requests]
        batches = plan_requests(b, requests)
        found.micro_batches += len(batches)
        found.decode_steps += decode_steps(batches, [r.max_new_tokens for r in requests])
        found.largest = max([found.largest] + [padded_tokens([requests[i] for i in batch]) for batch in batches])
        found.real_tokens += sum(chunk_lengths)
        found.padded_tokens += sum(chunk_lengths) / padding_efficiency(batches, chunk_lengths) if batches else 0
        for batch in batches if b.share_prefix else ():
            rows = [requests[i] for i in batch]
            found.shared += shared_prefix(rows) * (sum(r.params.num_return_sequences for r in rows) - 1)
            found.sequence_tokens += sum(len(r.prompt_ids) * r.params.num_return_sequences for r in rows)
        found.rows += chunk.num_rows
    return found


def say_rows(plan, sample: Sample) -> None:
    """The input, and what the sampled rows would be: error rows, repeats."""
    id_column = plan.settings.passthrough_columns[0]
    print(f"lmbatch dry run: {plan.inputs.num_rows:,} rows in {len(plan.inputs.files)} files, "
          f"{len(plan.chunks)} chunks of <= {plan.chunk_rows} rows, {len(plan.pending)} to generate")
    print(f"sampled {sample.rows:,} rows: {sample.errors} would be error rows, {sample.repeats} repeat an earlier "
          f"row's prompt and greedy settings (copied, not generated); {plan.num_duplicate_rows} rows in the input "
          "repeat an earlier id")
    for row_id, error in sample.error_examples:
        print(f"  error row {id_column}={row_id!r}: {error}")
    if plan.job.output.too_many_errors(sample.rows, sample.errors):
        print(f"warning: {sample.errors / sample.rows:.1%} of the sampled rows would be error rows, over "
              f"output.max_error_fraction={plan.job.output.max_error_fraction}: the job would stop")


def say_first_prompt(plan, row_id, request) -> None:
    """Exactly what the model is given for the first row: template, chat template and special tokens shown."""
    s = plan.settings
    tokenizer = load_tokenizer(s.tokenizer_path, s.trust_remote_code, s.tokenizer_class, s.tokenizer_revision)
    print(f"the first row's prompt as the model is given it ({s.passthrough_columns[0]}={row_id!r}, "
          f"{len(request.prompt_ids)} tokens, special tokens shown):")
    print(shown_prompt(tokenizer.decode(request.prompt_ids, skip_special_tokens=False)))
    if request.choices:  # how a label is written decides its tokens (" positive" or "positive")
        print("its choices as the model's tokens: " + "; ".join(
            f"{text!r} = {' + '.join(repr(tokenizer.decode([t])) for t in ids)}" for text, ids in request.choices))
    if request.pattern:  # what a json_schema becomes: what the text will match, whitespace and all
        shown, more = request.pattern[:400], len(request.pattern) - 400
        print(f"its text is held to the regular expression {shown}"
              + (f"... ({more:,} characters more)" if more > 0 else ""))


def say_plan(plan, sample: Sample) -> None:
    """The prompts' lengths, and the micro-batches, decode steps and KV cache planned for them."""
    b = plan.job.batching
    print("prompt tokens   rows")
    peak = max((c for _, c in histogram(sample.lengths)), default=1)
    for label, count in histogram(sample.lengths):
        print(f"  {label:>11}  {count:>6}  {'#' * max(1, round(40 * count / peak))}")
    print(f"planned micro-batches ({b.strategy}): {sample.micro_batches} for the sampled rows, "
          f"{sample.rows / max(sample.micro_batches, 1):.1f} rows each on average, prefill padding efficiency "
          f"{sample.padding_efficiency:.3f}")
    if sample.shared:  # a template whose instructions come first is computed once per micro-batch
        print(f"prompt tokens shared within the planned micro-batches, computed once for each: {sample.shared:,} of "
              f"the {sample.sequence_tokens:,} their sequences hold ({sample.shared / sample.sequence_tokens:.0%}; "
              "batching.share_prefix)")
    kv, largest, steps = plan.kv_bytes_per_token, sample.largest, sample.decode_steps
    if sample.micro_batches and not steps:  # max_new_tokens 0: no decode steps, and no KV cache kept
        print("nothing is generated: each micro-batch is one forward pass over its prompts, which are only "
              "embedded, scored or classified")
    else:  # on a GPU a decode step costs about the same for one row as for hundreds: steps are the cost
        print(f"planned decode steps for the sampled rows: at most {steps:,} "
              "(a micro-batch runs to its largest max_new_tokens)")
    if kv and largest and steps:  # what a GPU must hold for a micro-batch besides the weights: sizes max_batch_tokens
        print(f"KV cache of the largest planned micro-batch: {largest:,} tokens x {kv:,} bytes "
              f"({plan.job.replica_dtype}) = {_size(largest * kv)} (batching.max_batch_tokens="
              f"{b.max_batch_tokens:,} allows {_size(b.max_batch_tokens * kv)})")
