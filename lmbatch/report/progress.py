"""Visibility while a job runs: the progress line, and the metrics the end-of-run summary reads.

Both are built from the one summary row per chunk that replicas return, so the driver holds
counters, never rows. A chunk can take minutes, so replicas also report the rows done so far in
the chunk they are generating to `LiveChunks`, a small Ray actor that the driver polls for the
progress line. The summary itself: `summary`; the peak of a figure over the run: `samplers`.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time
from typing import Optional, TextIO

from lmbatch.report.summary import duration, ratio


class Progress:
    def __init__(self, total_rows: int, done_rows: int = 0, every_s: float = 5.0, stream: Optional[TextIO] = None,
                 replicas: int = 0, generates: bool = True):
        self.lock = threading.Lock()  # summaries come in on the main thread, live counts on a poller
        self.total_rows, self.skipped_rows = total_rows, done_rows
        self.every_s, self.stream = every_s, stream or sys.stdout  # the one of now, not of import time
        self.tty, self.tty_width = self.stream.isatty(), 0
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self.first_ready: Optional[float] = None
        self.sums: collections.Counter = collections.Counter()
        self.error_kinds: collections.Counter = collections.Counter()
        self.storage_retries: collections.Counter = collections.Counter()
        """Storage requests tried again, by kind (a store's throttling, dropped connections), in all processes."""
        self.replicas: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.chunks = 0
        self.finished: set[str] = set()
        self.live: dict[str, tuple[int, int]] = {}
        """Chunk -> (rows, generated tokens) done so far, for chunks still being generated."""
        self.shown_rows = done_rows
        self.replicas_expected, self.replicas_ready = replicas, 0
        """Replicas the job starts, and how many have loaded their model (shown until all have)."""
        self.chunk_restarts = 0
        """Chunks started again because the replica process generating them died."""
        self.pace_origin: Optional[tuple[float, int]] = None
        """(time, rows done) of the first line showing rows of this run: the time left is estimated from there."""
        self.generates = generates
        """Whether the job generates tokens: the line shows their rate; else (its prompts only embedded or
        scored) rows/s."""

    def add(self, summaries: list[dict]) -> None:
        with self.lock:
            for s in summaries:
                self.chunks += 1
                self.finished.add(s["chunk"])
                self.live.pop(s["chunk"], None)
                self.first_ready = min(self.first_ready or s["ready_at"], s["ready_at"])
                for key in ("rows", "errors", "cut_rows", "repeated_rows", "truncated_rows", "prompt_tokens",
                            "padded_prompt_tokens", "generated_tokens", "decode_slots", "split_retries",
                            "shared_prefix_tokens"):
                    self.sums[key] += s[key]
                self.error_kinds.update(json.loads(s["error_kinds"]))
                self.storage_retries.update(json.loads(s.get("storage_retries", "{}")))
                replica = self.replicas[s["replica"]]
                replica.update(rows=s["rows"], generated_tokens=s["generated_tokens"], chunks=1)
                replica["seconds"] += s["seconds"]

    def update_live(self, reported: list[tuple[str, int, int]], replicas_ready: int = 0,
                    chunk_restarts: int = 0) -> None:
        """Take `LiveChunks.snapshot()`: rows and tokens done so far in chunks still running."""
        with self.lock:
            self.replicas_ready = max(self.replicas_ready, replicas_ready)
            self.chunk_restarts = max(self.chunk_restarts, chunk_restarts)
            live: dict[str, tuple[int, int]] = {}
            for chunk, rows, tokens in reported:
                if chunk not in self.finished:  # a retried chunk may be reported by two replicas
                    live[chunk] = max(live.get(chunk, (0, 0)), (rows, tokens))
            self.live = live

    def print_line(self, final: bool = False) -> None:
        with self.lock:
            now = time.perf_counter()
            live_rows = sum(rows for rows, _ in self.live.values())
            live_tokens = sum(tokens for _, tokens in self.live.values())
            # Never backwards: a replica's report of its next chunk can replace its last one before
            # that chunk's summary is in.
            done = self.shown_rows = max(self.shown_rows, self.skipped_rows + self.sums["rows"] + live_rows)
            frac = done / self.total_rows if self.total_rows else 1.0
            bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
            elapsed = max(now - self.started, 1e-9)
            # The pace since rows first came in, so that start-up (Ray, model loads) does not inflate it.
            if self.pace_origin is None and done > self.skipped_rows:
                self.pace_origin = (now, done)
            t0, d0 = self.pace_origin or (now, done)
            rate = (done - d0) / (now - t0) if now > t0 else 0.0
            eta = f" | eta {duration((self.total_rows - done) / rate)}" if rate and done < self.total_rows else ""
            pace = (f"{(self.sums['generated_tokens'] + live_tokens) / elapsed:,.0f} gen tok/s" if self.generates
                    else f"{rate or (done - self.skipped_rows) / elapsed:,.1f} rows/s")  # with start-up, at first
            line = (f"[lmbatch] [{bar}] {done}/{self.total_rows} rows ({frac:.0%}) | {pace} | "
                    f"{self.sums['errors']} errors | {duration(elapsed)}{eta}")
            if self.chunk_restarts:  # replicas dying (killed for memory, crashing) show before the summary
                line += f" | {self.chunk_restarts} chunks restarted"
            # Start-up can take minutes (model loads): say so. A replica that sent a summary is ready
            # even if its report is not in yet.
            ready = max(self.replicas_ready, len(self.replicas))
            if ready < self.replicas_expected and done < self.total_rows:
                line += f" | replicas starting: {ready}/{self.replicas_expected} ready"
            if self.tty:  # rewritten in place: blank out what a longer line before left behind
                line, self.tty_width = "\r" + line.ljust(self.tty_width), len(line)
            self.stream.write(line + ("\n" if final or not self.tty else ""))
            self.stream.flush()

    def status(self) -> dict:
        """How far the run has got, as its last progress line said."""
        with self.lock:
            return {"rows_done": self.shown_rows, "rows_total": self.total_rows}

    def metrics(self) -> dict:
        wall = time.perf_counter() - self.started
        s = self.sums
        return {
            "rows_this_run": s["rows"],
            "rows_skipped_as_done": self.skipped_rows,
            "rows_ok_this_run": s["rows"] - s["errors"],
            "rows_error_this_run": s["errors"],
            "errors_by_kind": dict(self.error_kinds),
            "rows_cut_at_token_limit": s["cut_rows"],
            "rows_repeating_a_prompt": s["repeated_rows"],
            "rows_truncated": s["truncated_rows"],
            "chunks_this_run": self.chunks,
            "prompt_tokens": s["prompt_tokens"],
            "generated_tokens": s["generated_tokens"],
            "wall_seconds": round(wall, 3),
            "startup_seconds": round(self.first_ready - self.started_wall, 3) if self.first_ready else None,
            "rows_per_s": round(s["rows"] / wall, 3) if wall else None,
            "generated_tokens_per_s": round(s["generated_tokens"] / wall, 3) if wall else None,
            "prompt_tokens_per_s": round(s["prompt_tokens"] / wall, 3) if wall else None,
            "padding_efficiency": ratio(s["prompt_tokens"], s["padded_prompt_tokens"]),
            "decode_slot_efficiency": ratio(s["generated_tokens"], s["decode_slots"]),
            "micro_batch_split_retries": s["split_retries"],
            "prompt_tokens_shared": s["shared_prefix_tokens"],
            "chunk_restarts": self.chunk_restarts,
            "storage_retries": dict(self.storage_retries.most_common()),
            "replicas": {
                name: {**dict(r), "seconds": round(r["seconds"], 3),
                       "generated_tokens_per_s": round(r["generated_tokens"] / r["seconds"], 3) if r["seconds"] else None}
                for name, r in sorted(self.replicas.items())
            },
        }


class LiveChunks:
    """Run as a Ray actor without CPUs: the chunk each replica is generating, with its rows and
    generated tokens so far. One entry per replica, so it stays small however long the job.

    It also outlives the replicas, so it remembers for them how often each chunk was started (Ray
    starts a chunk again only when the replica process generating it died: a count per chunk, a few
    bytes each), for a chunk generated one row at a time to find the row that kills the process,
    the row in flight, and how often each replica began loading the model since it last had it
    loaded (Ray keeps a replica's actor id across the restarts of its process)."""

    def __init__(self):
        self.by_replica: dict[str, tuple[str, int, int]] = {}
        self.ready: set[str] = set()  # actor ids of the replicas with the model loaded
        self.loads: collections.Counter = collections.Counter()
        self.starts: collections.Counter = collections.Counter()
        self.row_in_flight: dict[str, int] = {}
        self.crashing_rows: dict[str, list[int]] = {}

    def start_chunk(self, chunk: str) -> tuple[int, list[int]]:
        """Count a start of `chunk`: (earlier starts, rows found to kill the process, each alone)."""
        self.starts[chunk] += 1
        if chunk in self.row_in_flight:  # its process died generating this row alone
            self.crashing_rows.setdefault(chunk, []).append(self.row_in_flight.pop(chunk))
        return self.starts[chunk] - 1, self.crashing_rows.get(chunk, [])

    def row_started(self, chunk: str, row: Optional[int]) -> None:
        """The row of `chunk` now generated alone (None: none, the chunk's rows are done)."""
        if row is None:
            self.row_in_flight.pop(chunk, None)
        else:
            self.row_in_flight[chunk] = row

    def start_load(self, actor: str) -> tuple[int, int]:
        """Count a model load begun by replica `actor`: (its earlier loads since it last had the model
        loaded, each ended by its process dying; replicas with the model loaded now)."""
        self.ready.discard(actor)
        self.loads[actor] += 1
        return self.loads[actor] - 1, len(self.ready)

    def replica_ready(self, actor: str) -> None:
        self.ready.add(actor)
        self.loads.pop(actor, None)

    def report(self, replica: str, chunk: str, rows: int, generated_tokens: int) -> None:
        self.by_replica[replica] = (chunk, rows, generated_tokens)

    def snapshot(self) -> tuple[list[tuple[str, int, int]], int, int]:
        """(chunk, rows, generated tokens) of each chunk being generated; replicas ready so far;
        chunks started again (their replica process died)."""
        return list(self.by_replica.values()), len(self.ready), sum(self.starts.values()) - len(self.starts)


class LiveReporter:
    """A replica's per-micro-batch callback for one chunk: counts what is done and tells the
    `LiveChunks` actor at most once per `every_s` (fire and forget: generation never waits on it)."""

    def __init__(self, live_chunks, replica: str, chunk: str, every_s: float = 1.0):
        self.live_chunks, self.replica, self.chunk, self.every_s = live_chunks, replica, chunk, every_s
        self.rows = self.generated_tokens = 0
        self.last = time.perf_counter()

    def __call__(self, completions: list) -> None:
        self.rows += len(completions)
        self.generated_tokens += sum(c.num_generated_tokens for c in completions)
        if time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            self.live_chunks.report.remote(self.replica, self.chunk, self.rows, self.generated_tokens)


        # else the job is stopping: no wait on a call to what may have gone with it (Ray, on a
        # SIGTERM to the whole process group, waits 60 s for its dead GCS); the thread is a daemon


