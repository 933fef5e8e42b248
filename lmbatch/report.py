"""Visibility: a progress line during the run, the end-of-run summary, and peak sampling.

The first two are built from the one summary row per chunk that replicas return, so the driver
holds counters, never rows. `PeakSampler` watches a figure (Ray's object-store bytes here; process
memory in the benchmarks) on a thread and keeps its peak.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from typing import Any, Callable, Optional, TextIO


class Progress:
    def __init__(self, total_rows: int, done_rows: int = 0, every_s: float = 5.0, stream: TextIO = sys.stdout):
        self.total_rows, self.skipped_rows = total_rows, done_rows
        self.every_s, self.stream = every_s, stream
        self.tty = stream.isatty()
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.first_ready: Optional[float] = None
        self.last_print = 0.0
        self.sums: collections.Counter = collections.Counter()
        self.error_kinds: collections.Counter = collections.Counter()
        self.replicas: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.chunks = 0

    def add(self, summaries: list[dict]) -> None:
        for s in summaries:
            self.chunks += 1
            self.first_ready = min(self.first_ready or s["ready_at"], s["ready_at"])
            for key in ("rows", "errors", "prompt_tokens", "padded_prompt_tokens", "generated_tokens",
                        "decode_slots", "split_retries"):
                self.sums[key] += s[key]
            self.error_kinds.update(json.loads(s["error_kinds"]))
            replica = self.replicas[s["replica"]]
            replica.update(rows=s["rows"], generated_tokens=s["generated_tokens"], chunks=1)
            replica["seconds"] += s["seconds"]
        if time.perf_counter() - self.last_print >= self.every_s:
            self.print_line()

    def print_line(self, final: bool = False) -> None:
        self.last_print = time.perf_counter()
        done = self.skipped_rows + self.sums["rows"]
        frac = done / self.total_rows if self.total_rows else 1.0
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        elapsed = max(self.last_print - self.started, 1e-9)
        line = (f"[lmbatch] [{bar}] {done}/{self.total_rows} rows ({frac:.0%}) | "
                f"{self.sums['generated_tokens'] / elapsed:,.0f} gen tok/s | {self.sums['errors']} errors | "
                f"{elapsed:,.0f}s")
        end = "\n" if final or not self.tty else ""
        self.stream.write(("\r" if self.tty else "") + line + end)
        self.stream.flush()

    def metrics(self) -> dict:
        wall = time.perf_counter() - self.started
        s = self.sums
        return {
            "rows_this_run": s["rows"],
            "rows_skipped_as_done": self.skipped_rows,
            "rows_ok_this_run": s["rows"] - s["errors"],
            "rows_error_this_run": s["errors"],
            "errors_by_kind": dict(self.error_kinds),
            "chunks_this_run": self.chunks,
            "prompt_tokens": s["prompt_tokens"],
            "generated_tokens": s["generated_tokens"],
            "wall_seconds": round(wall, 3),
            "startup_seconds": round(self.first_ready - self.started_wall, 3) if self.first_ready else None,
            "rows_per_s": round(s["rows"] / wall, 3) if wall else None,
            "generated_tokens_per_s": round(s["generated_tokens"] / wall, 3) if wall else None,
            "padding_efficiency": _ratio(s["prompt_tokens"], s["padded_prompt_tokens"]),
            "decode_slot_efficiency": _ratio(s["generated_tokens"], s["decode_slots"]),
            "micro_batch_split_retries": s["split_retries"],
            "replicas": {
                name: {**dict(r), "seconds": round(r["seconds"], 3),
                       "generated_tokens_per_s": round(r["generated_tokens"] / r["seconds"], 3) if r["seconds"] else None}
                for name, r in sorted(self.replicas.items())
            },
        }


class PeakSampler:
    """Calls `measure` every `interval` seconds on a thread while in a `with` block and keeps the
    peak of what it returns (a number, or a tuple of numbers whose peaks are kept one by one).

    Sampling costs CPU that the measured work then lacks, so intervals are seconds, not
    milliseconds. A `measure` of None, or one that raises, leaves `peak` as far as it got.
    """

    def __init__(self, measure: Optional[Callable[[], Any]], interval: float):
        self.measure, self.interval, self.peak = measure, interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _take(self) -> bool:
        try:
            value = self.measure()
        except Exception:  # noqa: BLE001 - what is watched has gone (a process, Ray shutting down)
            return False
        if self.peak is None:
            self.peak = value
        elif isinstance(value, tuple):
            self.peak = tuple(map(max, self.peak, value))
        else:
            self.peak = max(self.peak, value)
        return True

    def _run(self):
        while not self._stop.wait(self.interval) and self._take():
            pass

    def __enter__(self):
        if self.measure is not None and self._take():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self._take()


def object_store_bytes() -> Optional[Callable[[], int]]:
    """A measure of the bytes in Ray's object store, asked of the raylet through the call behind
    `ray memory`; None where that needs grpcio (installed by `ray[default]`, not by `ray[data]`)."""
    try:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        measure = lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used  # noqa: E731
        measure()
        return measure
    except Exception:  # noqa: BLE001 - no grpcio, or another Ray version: the figure is optional
        return None


def megabytes(n: Optional[int]) -> Optional[float]:
    return None if n is None else round(n / 2**20, 1)


def _ratio(a: int, b: int) -> Optional[float]:
    return round(a / b, 4) if b else None


def format_summary(metrics: dict, totals: dict) -> str:
    """A short table for the terminal; the same numbers are saved as _metrics.json."""
    rows = [
        ("rows in output", f"{totals['rows']:,}"),
        ("rows ok / error", f"{totals['rows_ok']:,} / {totals['rows_error']:,}"),
        ("rows generated this run", f"{metrics['rows_this_run']:,} (skipped as done: {metrics['rows_skipped_as_done']:,})"),
        ("errors by kind (this run)", ", ".join(f"{k}: {v}" for k, v in metrics["errors_by_kind"].items()) or "none"),
        ("tokens in / out", f"{metrics['prompt_tokens']:,} / {metrics['generated_tokens']:,}"),
        ("generated tokens/s", f"{metrics['generated_tokens_per_s'] or 0:,.1f}"),
        ("rows/s", f"{metrics['rows_per_s'] or 0:,.2f}"),
        ("padding efficiency", f"{metrics['padding_efficiency']}"),
        ("decode slot efficiency", f"{metrics['decode_slot_efficiency']}"),
        ("wall time", f"{metrics['wall_seconds']:,.1f}s"),
    ]
    if metrics.get("object_store_peak_mb") is not None:
        rows.append(("object store peak", f"{metrics['object_store_peak_mb']:,.1f} MB"))
    for name, r in metrics["replicas"].items():
        rows.append((f"replica {name}", f"{r['rows']:,} rows, {r['generated_tokens_per_s'] or 0:,.1f} gen tok/s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
