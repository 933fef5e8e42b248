"""The Ray actor that holds one model replica and turns prepared chunks into committed parts.

Each call receives whole prepared chunks (rows tagged with their chunk id and position),
generates them, puts every row back in input order under an index that fails loudly on a
missing or duplicated row, writes the chunk's part atomically and returns one summary row
per chunk for the driver's progress and metrics. A replica whose generation hangs ends its
process, and a chunk whose replica processes keep dying is generated one row at a time, to find
the row that kills them (`faults`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import time

import pyarrow as pa
import pyarrow.compute as pc

from lmbatch.config import JobConfig
from lmbatch.engine.requests import identical_requests, with_repeats
from lmbatch.engine.types import Completion, Request, error_rows
from lmbatch.errors import error_kind
from lmbatch.output.columns import list_column, output_columns, split_reasoning
from lmbatch.output.directory import OutputDir, with_part_metadata
from lmbatch.output.json_column import parsed_column
from lmbatch.prepare.settings import CHUNK, CHUNK_ROWS, ERROR, NUM_PROMPT_TOKENS, READ_RETRIES, ROW
from lmbatch.replica.faults import CRASHED, StallWatchdog, check_load_deaths, isolating
from lmbatch.replica.requests import chunk_requests, sampling_params
from lmbatch.report.progress import LiveReporter
from lmbatch.retrying import set_policy, take_counts

log = logging.getLogger(__name__)


def load_engine(job: JobConfig, device: str | None = None):
    if job.engine == "echo":  # no torch or transformers import in this process
        from lmbatch.engine.echo import EchoEngine

        return EchoEngine(job.batching)
    from transformers.utils import logging as transformers_logging

    from lmbatch.engine.hf import HFEngine
    from lmbatch.models import resolve_model_path
    from lmbatch.models.remote import is_remote, local_copy

    # a model in a bucket: copied once per node, into the cache the node's replicas share
    path = local_copy(job.model.path) if is_remote(job.model.path) else resolve_model_path(job.model.path)
    adapters = [(f"model.adapters.{name}", local) for name, local in job.model.adapters.items()]
    for key, local in (("model.path", path), ("model.adapter", job.model.adapter), *adapters):
        if local and os.path.isabs(local) and not os.path.exists(local):  # the driver found it, on its own node
            raise FileNotFoundError(f"{key} {local} does not exist on {socket.gethostname()}: "
                                    "a local model directory must exist on every node")
    # One progress line is the driver's; a "Loading weights" bar per replica would interleave with it.
    transformers_logging.disable_progress_bar()
    if job.engine == "vllm":
        from lmbatch.engine.vllm import VLLMEngine

        return VLLMEngine.load(path, job, gpus=job.cluster.gpus_per_replica)
    return HFEngine.load(path, job.model, job.batching, device=device, threads=job.cluster.threads)


class Replica:
    def __init__(self, job: JobConfig, output_uri: str, passthrough_columns: list[str],
                 fingerprint: str, live_chunks=None):
        import ray

        logging.basicConfig(level=logging.INFO)
        set_policy(job.storage.policy)
        device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.output = OutputDir(output_uri, job.output.partition_by, job.output.compression)
        actor = ray.get_runtime_context().get_actor_id() if ray.is_initialized() else None
        if live_chunks is not None and actor is not None:
            check_load_deaths(*ray.get(live_chunks.start_load.remote(actor)))
        # A hung mount (the output's, the model's) or download: end, and be restarted.
        with StallWatchdog(job.cluster.load_timeout_s):
            self.output.check_shared(fingerprint, f"replica {self.name}")  # before minutes of model loading
            self.engine = load_engine(job, device)
        self.generation = job.generation
        self.columns = output_columns(job)
        self.reasoning_tags = job.output.reasoning_tags
        self.params = sampling_params(job.generation)
        self.passthrough = passthrough_columns
        self.fingerprint = fingerprint
        self.live_chunks = live_chunks  # the driver's LiveChunks actor (None: no progress within chunks)
        self.watchdog = StallWatchdog(job.cluster.stall_timeout_s)
        self.ready_at = time.time()  # wall clock: the driver reports start-up (Ray, model load) apart
        if live_chunks is not None and actor is not None:
            live_chunks.replica_ready.remote(actor)

    def __call__(self, batch: pa.Table) -> pa.Table:
        summaries = []
        retries = collections.Counter(json.loads((batch.schema.metadata or {}).get(READ_RETRIES, b"{}")))
        for chunk_id in pc.unique(batch[CHUNK]).to_pylist():
            rows = batch.filter(pc.equal(batch[CHUNK], chunk_id))
            expected = rows[CHUNK_ROWS][0].as_py()
            if rows.num_rows != expected:  # Ray split a chunk across calls: never write part of one
                raise RuntimeError(f"chunk {chunk_id} arrived with {rows.num_rows} of {expected} rows")
            started = time.perf_counter()
            before = dict(vars(self.engine.stats))
            with self.watchdog:  # re-armed by each micro-batch; a write that hangs (a stale mount) ends it too
                table, counts = self.generate_chunk(chunk_id, rows)
                self.output.write_part(chunk_id, with_part_metadata(table, self.fingerprint, chunk_id))
            # this process's storage retries since its last chunk (its start-up's too), with the read's
            retries.update(take_counts())
            summaries.append({**self._summary(chunk_id, table, counts, before, time.perf_counter() - started),
                              "storage_retries": json.dumps(dict(retries))})
            retries = collections.Counter()
        return pa.Table.from_pylist(summaries)

    def generate_chunk(self, chunk_id: str, rows: pa.Table) -> tuple[pa.Table, dict]:
        """Generate every valid row of a chunk; return the output rows in input order, and counts for
        the chunk's summary: rows that repeated an earlier one's prompt and settings (greedy), so took a
        copy of its completion, and rows whose prompt was cut to fit the context (on_too_long=truncate)."""
        rows = rows.sort_by(ROW)
        positions = rows[ROW].to_pylist()
        if positions != list(range(len(positions))):
            raise RuntimeError(f"chunk {chunk_id}: row positions are not 0..{len(positions) - 1}")
        errors = rows[ERROR].to_pylist()
        requests = chunk_requests(rows, self.generation, self.passthrough[0])
        unique, repeats = identical_requests(requests)
        live = LiveReporter(self.live_chunks, self.name, chunk_id) if self.live_chunks is not None else None
        rearm_and_report = self.watchdog.rearming(live)

        def on_batch(done: list[Completion]) -> None:  # a repeat counts as a row done, not as tokens generated
            copies = with_repeats(done, repeats)[len(done):]
            rearm_and_report([*done, *(dataclasses.replace(c, num_generated_tokens=0) for c in copies)])
        completions = self._generate(chunk_id, unique, on_batch)
        by_row = self._index(with_repeats(completions, repeats), {r.key for r in requests}, chunk_id)

        n = self.params.num_return_sequences
        done: list[Completion] = []
        for i, err in enumerate(errors):
            for s in range(n):
                done.append(Completion(i, s, None, 0, "error", err) if err is not None else by_row[(i, s)])
        out = rows.select(self.passthrough).take(pa.array([c.key for c in done], pa.int64()))
        prompt_tokens = rows[NUM_PROMPT_TOKENS].to_pylist()
        texts, reasoning = [c.text for c in done], [None] * len(done)
        if self.reasoning_tags:
            reasoning, texts = zip(*(split_reasoning(text, *self.reasoning_tags) for text in texts))
        values = {
            "generated_text": texts,
            "reasoning": reasoning,
            "num_prompt_tokens": [prompt_tokens[c.key] for c in done],
            "num_generated_tokens": [c.num_generated_tokens for c in done],
            "finish_reason": [c.finish_reason for c in done],
            "error": [c.error for c in done],
            "sample_index": [c.sample_index for c in done],
            "logprob": [c.logprob for c in done],
            "choice_logprobs": [c.choice_logprobs for c in done],
            "prompt_logprob": [c.prompt_logprob for c in done],
            "label": [c.label for c in done],
        }
        for f in self.columns:
            if f.name == "generated_json":  # parsed from the answers, a value that does not fit the type null
                out = out.append_column(f, parsed_column(texts, f.type))
            elif f.name in ("token_logprobs", "embedding", "label_scores"):  # Arrow values per row, not objects
                out = out.append_column(f, list_column([getattr(c, f.name) for c in done], f.type.value_type))
            else:
                out = out.append_column(f, pa.array(values[f.name], f.type))
        truncated = sum(len(r.prompt_ids) < prompt_tokens[r.key] for r in requests)
        return out, {"repeated_rows": len(requests) - len(unique), "truncated_rows": truncated}

    def _generate(self, chunk_id: str, requests: list[Request], on_batch) -> list[Completion]:
        """Generate a chunk's requests together, or, once DEATHS_BEFORE_ISOLATING processes have died
        generating the chunk, one at a time, telling `LiveChunks` which row is in flight: the next
        process to start the chunk then writes that row as an error row instead of dying on it too."""
        if self.live_chunks is None:
            return self.engine.generate(requests, on_batch)
        import ray

        deaths, crashing = ray.get(self.live_chunks.start_chunk.remote(chunk_id))
        if not isolating(chunk_id, deaths):
            return self.engine.generate(requests, on_batch)
        log.warning("chunk %s: %d replica processes died generating it; generating its rows one at a time "
                    "(%d found to kill the process so far)", chunk_id, deaths, len(crashing))
        completions = []
        for r in requests:
            if r.key in crashing:
                completions += error_rows(r, CRASHED)
            else:
                ray.get(self.live_chunks.row_started.remote(chunk_id, r.key))
                completions += self.engine.generate([r], on_batch)
        ray.get(self.live_chunks.row_started.remote(chunk_id, None))
        return completions

    def _index(self, completions: list[Completion], keys: set[int], chunk_id: str) -> dict:
        """Key completions by (row, sample); any missing or duplicated one is a bug, so fail loudly."""
        n = self.params.num_return_sequences
        index = {}
        for c in completions:
            if (c.key, c.sample_index) in index:
                raise RuntimeError(f"chunk {chunk_id}: row {c.key} sample {c.sample_index} generated twice")
            index[(c.key, c.sample_index)] = c
        missing = {(k, s) for k in keys for s in range(n)} - index.keys()
        if missing or len(index) != len(keys) * n:
            raise RuntimeError(f"chunk {chunk_id}: completions missing for {sorted(missing)[:5]} "
                               f"or unexpected ones present")
        return index

    def _summary(self, chunk_id: str, table: pa.Table, counts: dict, before: dict, seconds: float) -> dict:
        stats = vars(self.engine.stats)
        reasons = table["finish_reason"].to_pylist()
        kinds = collections.Counter(error_kind(e) for e in table["error"].to_pylist() if e is not None)
        return {
            "chunk": chunk_id,
            "replica": self.name,
            "rows": table.num_rows,
            "errors": reasons.count("error"),
            # the rows that generated nothing were only scored (max_new_tokens 0), not cut
            "cut_rows": sum(r == "length" and n > 0
                            for r, n in zip(reasons, table["num_generated_tokens"].to_pylist())),
            **counts,
            "error_kinds": json.dumps(dict(kinds)),  # JSON: the set of kinds varies per chunk
            "seconds": seconds,
            "ready_at": self.ready_at,
            **{k: stats[k] - before[k] for k in ("prompt_tokens", "padded_prompt_tokens", "generated_tokens",
                                                 "decode_slots", "split_retries", "shared_prefix_tokens")},
        }
