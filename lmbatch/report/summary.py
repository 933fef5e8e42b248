"""The summary a finished job prints and the figures it is made of, read at a glance: durations,
megabytes, ratios, error rows by kind, rows cut at their token limit.
"""

from __future__ import annotations

from typing import Optional

from lmbatch.errors import FAILED_IN_GENERATION


def duration(seconds: float) -> str:
    """7 -> '7s', 192 -> '3m12s', 7380 -> '2h03m'."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def megabytes(n: Optional[int]) -> Optional[float]:
    return None if n is None else round(n / 2**20, 1)


def ratio(a: int, b: int) -> Optional[float]:
    """a / b to 4 places (an efficiency), None where b is 0 (nothing was computed)."""
    return round(a / b, 4) if b else None


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def cut_rows(metrics: dict, held_to_pattern: bool = False) -> list[tuple[str, str]]:
    """The rows whose text ended at max_new_tokens (or max_length) rather than on its own, when they
    are many: a limit set too low cuts answers short, with nothing else to tell of it. Held to a JSON
    schema or a regular expression, any: such a text stops short of what the schema accepts."""
    cut, ok = metrics["rows_cut_at_token_limit"], metrics["rows_ok_this_run"]
    if not cut or (not held_to_pattern and cut / ok < 0.1):  # cut rows are rows ok
        return []
    why = ("a text held to a json_schema or regex that is cut is not one it accepts: raise generation.max_new_tokens, "
           "or bound the schema's strings and arrays") if held_to_pattern else (
        "raise generation.max_new_tokens if they should end on their own")
    return [("rows cut at token limit", f"{cut:,} ({cut / ok:.0%} of the rows ok this run: finish_reason length); "
                                        + why)]


def by_kind(counts: dict, most: Optional[int] = None) -> str:
    return ", ".join(f"{kind}: {n:,}" for kind, n in list(counts.items())[:most]) or "none"


def format_summary(metrics: dict, totals: dict, held_to_pattern: bool = False) -> str:
    """A short table for the terminal; the same numbers are saved as _metrics.json."""
    kinds = totals["rows_error_by_kind"]  # in the whole output
    retry = [("rows failed in generation", "once the cause is gone (a GPU too small, a bug), "
                                           "output.mode=retry_errors generates them again")
             ] if any(kind in FAILED_IN_GENERATION for kind in kinds) else []
    # A resumed run's own errors are only some of the output's.
    this_run = [("errors by kind (this run)", by_kind(metrics["errors_by_kind"]))
                ] if metrics["rows_skipped_as_done"] else []
    generated = metrics["generated_tokens"]
    rows = [
        ("rows in output", f"{totals['rows']:,}"),
        ("rows ok / error", f"{totals['rows_ok']:,} / {totals['rows_error']:,}"),
        ("rows written this run", f"{metrics['rows_this_run']:,} (skipped as done: {metrics['rows_skipped_as_done']:,})"),
        ("errors by kind", by_kind(kinds)),
        *this_run,
        *retry,
        *cut_rows(metrics, held_to_pattern),
        ("tokens in / out", f"{metrics['prompt_tokens']:,} / {metrics['generated_tokens']:,}"),
        # a run that generated nothing (its prompts only embedded, scored or classified, or every row done before)
        # has no decode rates to show
        *([("generated tokens/s", f"{metrics['generated_tokens_per_s'] or 0:,.1f}")] if generated else []),
        ("prompt tokens/s", f"{metrics['prompt_tokens_per_s'] or 0:,.1f}"),  # the rate of a job that only embeds
        ("rows/s", f"{metrics['rows_per_s'] or 0:,.2f}"),
        ("padding efficiency", _or_dash(metrics["padding_efficiency"])),  # None: nothing computed this run
        *([("decode slot efficiency", _or_dash(metrics["decode_slot_efficiency"]))] if generated else []),
        ("wall time", f"{metrics['wall_seconds']:,.1f}s"),
    ]
    if metrics.get("startup_seconds") is not None:  # what tokens/s above are diluted by on short jobs
        rows.append(("start-up", f"{metrics['startup_seconds']:,.1f}s (Ray, replicas, model loads)"))
    if metrics.get("rows_repeating_a_prompt"):  # fewer rows generated than written: say why
        rows.append(("rows repeating a prompt", f"{metrics['rows_repeating_a_prompt']:,} (greedy: each copied from "
                                                "the first row of its chunk with that prompt and settings)"))
    if metrics.get("prompt_tokens_shared"):  # what batching.share_prefix saved: prompt tokens not computed again
        rows.append(("prompt tokens shared", f"{metrics['prompt_tokens_shared']:,} (the prefix all prompts of a "
                                             "micro-batch begin with, computed once for them)"))
    if metrics.get("rows_truncated"):  # what input.on_too_long cut: the model saw less of them
        rows.append(("prompts truncated", f"{metrics['rows_truncated']:,} (too long for the context or "
                                          "input.max_prompt_tokens: cut to fit, as input.on_too_long says)"))
    if metrics.get("chunk_restarts"):  # each a replica process that died: killed, crashed, its node lost
        rows.append(("chunks restarted", f"{metrics['chunk_restarts']:,} (their replica process died: see the log)"))
    if metrics.get("storage_retries"):  # the store's faults ridden out: a job that survived a storm says so
        retries = metrics["storage_retries"]
        rows.append(("storage retries", f"{sum(retries.values()):,} ({by_kind(retries)}): requests the store "
                                        "failed for a moment, tried again"))
    if metrics.get("object_store_peak_mb") is not None:
        rows.append(("object store peak", f"{metrics['object_store_peak_mb']:,.1f} MB"))
    for name, r in metrics["replicas"].items():
        # a job that generated nothing (its prompts only embedded, scored or classified) goes at so many rows/s
        pace = (f"{r['generated_tokens_per_s'] or 0:,.1f} gen tok/s" if generated
                else f"{r['rows'] / r['seconds'] if r['seconds'] else 0:,.1f} rows/s")
        rows.append((f"replica {name}", f"{r['rows']:,} rows, {pace}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
