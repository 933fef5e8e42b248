"""The Ray actor that holds one model replica and turns prepared chunks into committed parts.

Each call receives whole prepared chunks (rows tagged with their chunk id and position),
generates them, puts every row back in input order under an index that fails loudly on a
missing or duplicated row, writes the chunk's part atomically and returns one summary row
per chunk for the driver's progress and metrics. A replica whose generation hangs ends its
process (`StallWatchdog`), and a chunk whose replica processes keep dying is generated one row
at a time, to find the row that kills them (`isolating`).
"""

from __future__ import annotations

import collections
import dataclasses
import faulthandler
import json
import logging
import os
import socket
import time
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from lmbatch.config import GenerationOptions, JobConfig
from lmbatch.decoding.structured import pattern
from lmbatch.engine.requests import identical_requests, row_seed, with_repeats
from lmbatch.engine.types import (
    Completion,
    Pooling,
    Request,
    SamplingParams,
    list_column,
)
from lmbatch.errors import error_kind
from lmbatch.output.columns import output_columns, split_reasoning
from lmbatch.output.directory import OutputDir, with_part_metadata
from lmbatch.output.json_column import parsed_column
from lmbatch.prepare.settings import (
    CHOICES,
    CHUNK,
    CHUNK_ROWS,
    ERROR,
    MAX_NEW,
    NUM_PROMPT_TOKENS,
    PARAMS,
    PROMPT_IDS,
    ROW,
    SECOND_TEXT,
)
from lmbatch.report.progress import LiveReporter

DEATHS_BEFORE_ISOLATING = 2
"""Deaths of the replica processes generating one chunk (a node lost, an out-of-memory kill, a crash
in native code) after which its rows are generated one at a time, so that a row that kills the
process is found and written as an error row. One node lost rarely hits one chunk twice."""
CRASHING_ROWS_PER_CHUNK = 6
"""Rows of one chunk that may kill their process, each found at the cost of a replica restart. Past
that the job stops (a rerun resumes): so many deaths point at the node or the model, not the rows.
(Ray Data itself retries a chunk whose process died without end.)"""
LOAD_DEATHS_BEFORE_STOPPING = 2
"""Deaths of one replica's process in a row while it loads the model (killed for memory: each replica
loads a copy; a crash in native code; a hang past cluster.load_timeout_s) after which, while no
replica has the model loaded, the job stops instead of letting Ray restart the replica without end.
While others generate, it goes on."""
CRASHED = ("crashed: the replica process died generating this row alone (a crash in native code, killed for "
           "memory, or stalled past cluster.stall_timeout_s)")

log = logging.getLogger(__name__)


def sampling_params(g: GenerationOptions) -> SamplingParams:
    """What the engine needs of a row's settings. Temperature 0 decodes greedily, as in OpenAI's API
    and vLLM, and top_k -1 is vLLM's "disabled", our 0. A greedy row's sampling controls are left at
    their defaults, as they change nothing, so that greedy rows share micro-batches (and repeats)
    whatever their columns say."""
    if g.do_sample and g.temperature > 0:
        sampling = dict(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=max(g.top_k, 0), min_p=g.min_p)
    else:
        sampling = {}
    return SamplingParams(**sampling, repetition_penalty=g.repetition_penalty, presence_penalty=g.presence_penalty,
                          frequency_penalty=g.frequency_penalty, stop=tuple(g.stop),
                          num_return_sequences=g.num_return_sequences, logprobs=g.logprobs,
                          top_logprobs=g.top_logprobs, prompt_logprobs=g.prompt_logprobs, adapter=g.adapter,
                          embedding=Pooling(g.embedding, g.embedding_dimensions, g.embedding_normalize)
                          if g.embedding else None, classify=g.classify)


def row_options(generation: GenerationOptions, overrides: str | None) -> GenerationOptions:
    """The job's generation settings with a row's parameter overrides (JSON, as prepare wrote them)."""
    return dataclasses.replace(generation, **json.loads(overrides)) if overrides else generation


def chunk_requests(rows: pa.Table, generation: GenerationOptions, id_column: str) -> list[Request]:
    """A request per valid row of a prepared chunk (error rows have none), keyed by its position."""
    job_params, job_pattern = sampling_params(generation), pattern(generation)
    requests = []
    for i, (ids, max_new, err, row_id, overrides, choices, second_text_start) in enumerate(zip(
            rows[PROMPT_IDS].to_pylist(), rows[MAX_NEW].to_pylist(), rows[ERROR].to_pylist(),
            rows[id_column].to_pylist(), rows[PARAMS].to_pylist(), rows[CHOICES].to_pylist(),
            rows[SECOND_TEXT].to_pylist())):
        if err is not None:
            continue
        g = row_options(generation, overrides)
        params = sampling_params(g) if overrides else job_params
        # The seed comes from the row's id, not its position: samples do not depend on chunking.
        requests.append(Request(key=i, prompt_ids=ids, max_new_tokens=max_new, params=params,
                                seed=row_seed(g.seed, row_id) if params.do_sample else 0,
                                choices=tuple(zip(g.choices, map(tuple, choices))) if choices else (),
                                pattern=pattern(g) if overrides else job_pattern,
                                second_text_start=second_text_start))
    return requests


def load_engine(job: JobConfig, device: str | None = None):
    if job.engine == "echo":  # no torch or transformers import in this process
        from lmbatch.engine.echo import EchoEngine

        return EchoEngine(job.batching)
    from transformers.utils import logging as transformers_logging

    from lmbatch.engine.hf import HFEngine
    from lmbatch.models import resolve_model_path

    path = resolve_model_path(job.model.path)
    adapters = [(f"model.adapters.{name}", local) for name, local in job.model.adapters.items()]
    for key, local in (("model.path", path), ("model.adapter", job.model.adapter), *adapters):
        if local and os.path.isabs(local) and not os.path.exists(local):  # the driver found it, on its own node
            raise FileNotFoundError(f"{key} {local} does not exist on {socket.gethostname()}: "
                                    "a local model directory must exist on every node")
    # One progress line is the driver's; a "Loading weights" bar per replica would interleave with it.
    transformers_logging.disable_progress_bar()
    return HFEngine.load(path, job.model, job.batching, device=device, threads=job.cluster.threads)


def isolating(chunk_id: str, deaths: int) -> bool:
    """Whether to generate a chunk's rows one at a time, after `deaths` processes died generating it.
    Raise (stopping the job) once more died than isolating rows explains."""
    if deaths > DEATHS_BEFORE_ISOLATING + CRASHING_ROWS_PER_CHUNK:
        raise RuntimeError(
            f"chunk {chunk_id}: {deaths} replica processes died generating it, {deaths - DEATHS_BEFORE_ISOLATING} "
            "of them on its rows alone; so many point at the node or the model, not the rows (killed for "
            "memory, a crash in native code, a hang past cluster.stall_timeout_s): the replica logs above say why")
    return deaths >= DEATHS_BEFORE_ISOLATING


def check_load_deaths(deaths: int, replicas_ready: int) -> None:
    """Before a replica loads the model, after `deaths` of its processes died loading it: raise
    (stopping the job) when that keeps happening and no replica has the model loaded, as the job
    would otherwise wait forever."""
    if deaths >= LOAD_DEATHS_BEFORE_STOPPING and not replicas_ready:
        raise RuntimeError(
            f"replica processes died {deaths} times in a row loading the model, and no replica has it loaded: "
            "killed for memory (each replica loads its own copy of the model: fewer cluster.num_replicas, a smaller "
            "model.dtype or nodes with more memory), a crash in native code or a load that hung past "
            "cluster.load_timeout_s; the replica logs above say why")
    if deaths:
        log.warning("this replica's process died %d time(s) in a row loading the model; %d replicas have it loaded "
                    "and generate meanwhile; loading it again", deaths, replicas_ready)


class StallWatchdog:
    """Ends this process, printing every thread's stack, when generation makes no progress for
    `timeout_s` (cluster.stall_timeout_s): armed while a chunk is generated, re-armed by each
    micro-batch done; and while the model loads (cluster.load_timeout_s). faulthandler's timer runs
    in a C thread of its own, so it fires even while a hung call holds the GIL. Ray then restarts the
    replica and retries the chunk."""

    def __init__(self, timeout_s: Optional[float]):
        self.timeout_s = timeout_s

    def arm(self) -> None:
        if self.timeout_s:
            faulthandler.dump_traceback_later(self.timeout_s, exit=True)

    def __enter__(self):
        self.arm()
        return self

    def __exit__(self, *exc) -> None:
        if self.timeout_s:
            faulthandler.cancel_dump_traceback_later()

    def rearming(self, on_batch):
        """`on_batch` (or nothing) after re-arming the timer: a micro-batch is done."""
        def call(completions):
            self.arm()
            if on_batch is not None:
                on_batch(completions)
        return call


class Replica:
    def __init__(self, job: JobConfig, output_uri: str, passthrough_columns: list[str],
                 fingerprint: str, live_chunks=None):
        import ray

        logging.basicConfig(level=logging.INFO)
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
            summaries.append(self._summary(chunk_id, table, counts, before, time.perf_counter() - started))
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
                completions += [Completion(r.key, s, None, 0, "error", CRASHED)
                                for s in range(r.params.num_return_sequences)]
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
