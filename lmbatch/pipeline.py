"""The job: plan everything up front, then read -> prepare -> replica pool -> commit with Ray Data.

    plan_job   inputs, model and output are checked before Ray starts or any model loads;
               the input is cut into chunks and the chunks already committed are skipped
    Ray Data   one block per pending chunk -> prepare (CPU tasks) -> Replica actors, which
               generate and write each chunk's part, returning one summary row per chunk
    commit     every planned part is checked (rows exactly once), then _manifest.json,
               _metrics.json and, last, _SUCCESS
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import lmbatch
from lmbatch import io
from lmbatch.config import ClusterConfig, ConfigError, JobConfig
from lmbatch.io import Chunk, InputPlan, JobError
from lmbatch.output import OutputDir, OutputState, with_part_metadata
from lmbatch.prepare import (PrepareSettings, RowError, direct_class_path, fit_to_context, load_tokenizer, prepare_chunk,
                             template_fields)
from lmbatch.replica import Replica, output_columns
from lmbatch.report import (LiveChunks, PeakSampler, Periodic, Progress, format_summary, megabytes,
                            object_store_bytes)

log = logging.getLogger("lmbatch.pipeline")


class JobFailed(RuntimeError):
    """The job failed while it ran (a replica could not load the model, a part could not be
    written, parts went missing): the message is one line on the cause; committed chunks stay."""


@dataclass
class JobPlan:
    job: JobConfig
    inputs: InputPlan
    settings: PrepareSettings
    output: OutputDir
    state: OutputState
    fingerprint: str
    chunk_rows: int
    chunks: list[Chunk]
    duplicate_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    """Chunk id -> positions of rows repeating an earlier id (empty with on_duplicate_id=ignore)."""

    @property
    def num_duplicate_rows(self) -> int:
        return sum(map(len, self.duplicate_rows.values()))

    def error_duplicates(self, chunk_id: str) -> list[int]:
        """Rows of a chunk to write as `duplicate id` error rows (only with on_duplicate_id=error)."""
        return self.duplicate_rows.get(chunk_id, []) if self.job.input.on_duplicate_id == "error" else []

    @property
    def pending(self) -> list[Chunk]:
        return [c for c in self.chunks if c.id not in self.state.done_chunks]

    @property
    def replicas(self) -> int:
        """Replicas this run starts: no more than the chunks it has to generate."""
        return min(self.job.cluster.num_replicas, len(self.pending))

    @property
    def rows_per_input_row(self) -> int:
        return self.job.generation.num_return_sequences


def to_job_config(cfg: Any) -> JobConfig:
    """Hydra's DictConfig -> the validated dataclass (runs every __post_init__ check)."""
    if isinstance(cfg, JobConfig):
        return cfg
    try:
        node = cfg if OmegaConf.get_type(cfg) is JobConfig else OmegaConf.merge(OmegaConf.structured(JobConfig), cfg)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


# -- planning: everything that can fail does so here, before Ray or a model ---------------------
def resolve_input_uri(path: str) -> str:
    from lmbatch.models import BUILTIN
    from lmbatch.samples import builtin_input_path

    if path.startswith(BUILTIN):
        try:
            return builtin_input_path(path[len(BUILTIN):])
        except ValueError as e:
            raise JobError(f"input.path {path}: {e}") from None
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def check_model(job: JobConfig) -> tuple[str, Optional[int]]:
    """(model path as workers should see it, context length); fails early on a missing model."""
    from transformers import AutoConfig

    from lmbatch.models import BUILTIN, check_weights, resolve_model_path

    path = job.model.path
    if not path.startswith(BUILTIN):
        expanded = os.path.expanduser(path)
        if os.path.exists(expanded):
            path = os.path.abspath(expanded)
            try:
                check_weights(path)
            except ValueError as e:
                raise JobError(f"model.path {job.model.path}: {e}") from None
        elif expanded.startswith(("/", ".")):
            raise JobError(f"model.path {job.model.path} does not exist")
    try:
        config = AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=job.model.trust_remote_code)
        tokenizer = load_tokenizer(path, job.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - hub, parsing and remote-code errors alike
        raise JobError(f"model.path {job.model.path} cannot be loaded: {str(e).splitlines()[0]}") from None
    if job.input.chat:
        check_chat_template(job, tokenizer)
    text_config = getattr(config, "get_text_config", lambda: config)()
    limit = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    vocab = getattr(text_config, "vocab_size", None)
    if vocab and len(tokenizer) > vocab:  # tokens added to the tokenizer, the model's embedding not resized
        print(f"lmbatch: warning: the tokenizer of {job.model.path} has {len(tokenizer):,} tokens, the model's "
              f"embedding {vocab:,}: a row holding one of the last {len(tokenizer) - vocab:,} fails "
              "(index out of range)")
    return path, limit


def check_chat_template(job: JobConfig, tokenizer) -> None:
    """The chat template must render the conversation the job builds around each row's text (a
    user message, after the system prompt if any): else every row would become an error row
    (templates raise on what they refuse, e.g. a system message). Conversations of a messages
    column vary by row, so there only the system prompt is tried."""
    if not tokenizer.chat_template:
        raise JobError(f"the tokenizer of {job.model.path} has no chat template, which input.messages_column, "
                       "input.system_prompt and input.apply_chat_template need")
    if job.input.messages_column and not job.input.system_prompt:
        return
    system = [{"role": "system", "content": job.input.system_prompt}] if job.input.system_prompt else []
    try:
        tokenizer.apply_chat_template([*system, {"role": "user", "content": "Hello"}], tokenize=False,
                                      add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001 - whatever the template raises
        raise JobError(f"the chat template of {job.model.path} fails on a single user message"
                       f"{' after input.system_prompt' if system else ''}: {e}") from None


def check_room_for_prompts(job: JobConfig, settings: PrepareSettings) -> None:
    """Refuse a job whose generation settings leave no room for even a one-token prompt (by
    prepare's own rule, fit_to_context): every row would become a `too long` error row after the
    whole job had run."""
    if {"max_new_tokens", "max_length"} & set(job.input.param_columns):
        return  # per-row settings may make room
    try:
        fit_to_context([0], settings, job.generation)
    except RowError:
        limit = settings.context_limit
        raise JobError(f"generation.max_new_tokens={job.generation.max_new_tokens} leaves no room for a prompt in "
                       f"the model's context of {limit} tokens; set it to at most {limit - 1}, or cap prompt and "
                       f"output together with generation.max_length={limit}") from None


def _passthrough_columns(job: JobConfig, inputs: InputPlan) -> list[str]:
    i = job.input
    keep = inputs.schema.names if i.keep_columns is None else i.keep_columns
    columns = list(dict.fromkeys([i.id_column, *keep]))
    clash = set(columns) & {f.name for f in output_columns(2)}
    if clash:
        raise JobError(f"input columns {sorted(clash)} clash with output columns; "
                       "rename them or leave them out with input.keep_columns")
    return columns


def _fingerprint(job: JobConfig, inputs: InputPlan) -> str:
    """What makes two runs the same job: the input files and everything that shapes a row's output."""
    identity = {
        "files": [(f.path, f.size, f.num_rows) for f in inputs.files],
        # limit is left to "files", which hold the rows taken: a limit above the input's rows is the
        # same job as none (and jobs from before the key keep their fingerprint)
        "input": {k: v for k, v in dataclasses.asdict(job.input).items() if k not in ("path", "limit")},
        # kv_cache is like batching: how rows are computed, not what they are (and 0.2.0 jobs resume)
        "model": {k: v for k, v in dataclasses.asdict(job.model).items() if k != "kv_cache"},
        "generation": dataclasses.asdict(job.generation),
        "engine": job.engine,
        "partition_by": job.output.partition_by,
        "chunk_layout": 2,  # chunks span files since 0.2: parts of an older layout must not be resumed
    }
    # Parts written before partition columns were read lack them: not the same job. Added only when
    # present, so other jobs keep their fingerprint (and resume).
    if inputs.partition_columns:
        identity["partition_columns"] = inputs.partition_columns
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_job(job: JobConfig) -> JobPlan:
    i = job.input
    input_uri = resolve_input_uri(i.path)
    output_uri = job.output.path if "://" in job.output.path else os.path.abspath(job.output.path)
    if io.is_inside(output_uri, input_uri) or io.is_inside(input_uri, output_uri):
        raise JobError(f"output.path {output_uri} overlaps input.path {input_uri}; write the output elsewhere")
    keep = i.keep_columns or []
    required = {i.text_column: "messages" if i.messages_column else "string", i.id_column: "any",
                **{c: "any" for c in keep + i.param_columns + template_fields(i.template)}}
    inputs = io.inspect_inputs(input_uri, required).head(i.limit)
    passthrough = _passthrough_columns(job, inputs)
    model_path, context_limit = check_model(job)

    partition_by = job.output.partition_by
    if partition_by and (partition_by not in passthrough or partition_by == i.id_column):
        raise JobError(f"output.partition_by={partition_by!r} must name a kept input column other than the id")
    output = OutputDir(output_uri, partition_by)
    fingerprint = _fingerprint(job, inputs)
    state = output.inspect(fingerprint, job.output.mode)
    configured = job.batching.chunk_rows
    if job.output.max_rows_per_file:  # one part per chunk: a smaller chunk is a smaller file
        configured = min(configured, max(1, job.output.max_rows_per_file // job.generation.num_return_sequences))
    chunk_rows = state.chunk_rows or io.choose_chunk_rows(inputs.num_rows, configured, job.cluster.num_replicas)
    settings = PrepareSettings(
        input_uri=input_uri, prompt_column=i.text_column, passthrough_columns=tuple(passthrough),
        tokenizer_path=model_path, generation=job.generation, param_columns=tuple(i.param_columns),
        context_limit=context_limit, on_too_long=i.on_too_long,
        template=i.template, chat=i.chat, system_prompt=i.system_prompt,
        trust_remote_code=job.model.trust_remote_code,
        tokenizer_class=direct_class_path(load_tokenizer(model_path, job.model.trust_remote_code), model_path),
        input_schema=inputs.schema,
    )
    check_room_for_prompts(job, settings)
    job = dataclasses.replace(job, model=dataclasses.replace(job.model, path=model_path))
    chunks = io.plan_chunks(inputs.files, chunk_rows)
    plan = JobPlan(job, inputs, settings, output, state, fingerprint, chunk_rows, chunks)
    if i.on_duplicate_id != "ignore" and not state.finished:
        plan.duplicate_rows = _duplicates_by_chunk(chunks, io.find_duplicate_ids(input_uri, inputs.files, i.id_column))
    return plan


def _duplicates_by_chunk(chunks: list[Chunk], positions: list[int]) -> dict[str, list[int]]:
    """Input positions (sorted) -> {chunk id: positions within the chunk}."""
    found: dict[str, list[int]] = {}
    for c in chunks:
        rows = positions[bisect.bisect_left(positions, c.start):bisect.bisect_left(positions, c.stop)]
        if rows:
            found[c.id] = [r - c.start for r in rows]
    return found


# -- execution ---------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(job: JobConfig):
    """Attach to `cluster.address` / RAY_ADDRESS, or start a local Ray bound to loopback."""
    import ray

    if ray.is_initialized():  # the caller (a test, a notebook) owns Ray
        yield
        return
    address = job.cluster.address or os.environ.get("RAY_ADDRESS")
    on_sigterm = signal.getsignal(signal.SIGTERM)
    if address:
        ray.init(address=address)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to the home directory
        # "local": a fresh Ray of our own, never a `ray start` cluster that happens to run here.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # ray.init leaves SIGTERM to its C++ failure handler, which arms a 3 s alarm that aborts the
        # process (exit -6) unless it has died by then; shutting Ray down takes about that long, so a
        # scheduler's stop ended in an abort more often than not (9 of 15 runs). Python's handler instead:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        ray.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds like Ctrl-C: Ray shuts down, the job says how to resume


def _prepare_batch(descriptors: pa.Table, settings: PrepareSettings) -> pa.Table:
    tables = []
    for d in descriptors.to_pylist():
        duplicates = d.pop("duplicate_rows")
        tables.append(prepare_chunk(Chunk.from_dict(d), settings, duplicates))
    return pa.concat_tables(tables)


def gpu_mismatch(cluster: ClusterConfig, gpus: float, replicas: int) -> Optional[str]:
    """What is wrong between the replicas and the Ray cluster's GPUs, if anything: GPUs left idle, or
    replicas that cannot start. Ray Data starts a pool's actors as resources allow, so replicas that
    need GPUs the cluster lacks wait, without a word, until GPUs join (an autoscaler adds them)."""
    per = cluster.gpus_per_replica
    if gpus and not per:
        return (f"the Ray cluster has GPUs ({gpus:g}), but cluster.gpus_per_replica=0: replicas run on CPU "
                "(for the GPUs: cluster=gpu_node batching=gpu)")
    fit = int(gpus // per) if per else replicas
    if fit < replicas:
        return (f"{replicas} replicas x {per:g} GPUs need {replicas * per:g}, the Ray cluster has {gpus:g}: "
                f"{f'only {fit} replicas' if fit else 'no replica'} can start until GPUs join the cluster "
                "(or lower cluster.num_replicas)")
    return None


def build_dataset(plan: JobPlan, live_chunks=None):
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False  # lmbatch prints its own
    # ...and Ray Data's warning on that, telling how to turn its bars back on, would only confuse.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    job, pending, replicas = plan.job, plan.pending, plan.replicas
    mismatch = gpu_mismatch(job.cluster, ray.cluster_resources().get("GPU", 0), replicas)
    if mismatch and job.engine == "hf":
        print(f"lmbatch: warning: {mismatch}")
    # One block per chunk: every replica gets work and a chunk never spans two replicas.
    items = [{**dataclasses.asdict(c), "duplicate_rows": plan.error_duplicates(c.id)} for c in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # No more prepare tasks at once than replicas, which take one chunk at a time: each task's worker
    # process loads the tokenizer (transformers, torch: ~4 s of CPU), so more only start processes
    # that compete with the replicas' own start-up (a 2-core job started in 22 s instead of 28).
    ds = ds.map_batches(_prepare_batch, fn_kwargs={"settings": plan.settings}, batch_size=1,
                        batch_format="pyarrow", num_cpus=job.cluster.prepare_cpus,
                        compute=TaskPoolStrategy(size=replicas))
    return ds.map_batches(
        Replica,
        fn_constructor_kwargs=dict(job=job, output_uri=plan.output.uri,
                                   passthrough_columns=list(plan.settings.passthrough_columns),
                                   fingerprint=plan.fingerprint, live_chunks=live_chunks),
        batch_size=None, batch_format="pyarrow",
        # One chunk at a time per replica: a model's chunk takes seconds to minutes (its dispatch
        # ~0.1 s), and one queued behind it would be pinned there while another replica runs idle.
        compute=ActorPoolStrategy(size=replicas, max_tasks_in_flight_per_actor=1),
        num_cpus=job.cluster.cpus_per_replica, num_gpus=job.cluster.gpus_per_replica or None,
    )


@contextlib.contextmanager
def live_progress(progress: Progress):
    """Yield a LiveChunks actor for replicas to report the rows done inside their chunks to (a chunk
    can take minutes), and print the progress line with them every `progress.every_s` meanwhile."""
    import ray

    live_chunks = ray.remote(num_cpus=0)(LiveChunks).remote()

    def tick():
        try:
            progress.update_live(*ray.get(live_chunks.snapshot.remote(), timeout=10))
        except ray.exceptions.RayError:  # the line still counts the finished chunks
            pass
        progress.print_line()

    try:
        with Periodic(tick, progress.every_s):
            yield live_chunks
    finally:
        ray.kill(live_chunks)


def count_committed(plan: JobPlan) -> dict:
    """Check that every planned chunk has its part with exactly its rows; count ok and error rows."""
    files = plan.output.part_files()
    missing = [c.id for c in plan.chunks if c.id not in files]
    if missing:
        raise JobFailed(f"parts for chunks {missing[:5]} are missing after the run (was the output changed while "
                        "the job ran?); run the same command again to generate them")

    def count(chunk: Chunk) -> tuple[int, int]:
        reasons = [pq.read_table(path, columns=["finish_reason"], filesystem=plan.output.fs)["finish_reason"]
                   for path in files[chunk.id]]
        return sum(map(len, reasons)), sum(r.to_pylist().count("error") for r in reasons)

    ok = error = 0
    for chunk, (rows, errors) in zip(plan.chunks, io.in_threads(count, plan.chunks)):
        expected = chunk.num_rows * plan.rows_per_input_row
        if rows != expected:
            raise JobFailed(f"parts of chunk {chunk.id} hold {rows} rows, expected {expected}: delete "
                            f"{', '.join(files[chunk.id])} and run the same command again to generate the chunk anew")
        ok, error = ok + rows - errors, error + errors
    return {"rows": ok + error, "rows_ok": ok, "rows_error": error, "parts": sum(map(len, files.values()))}


EMPTY_INPUT_CHUNK = "00000-000000000"  # the id of the chunk that would begin at the first row


def write_empty_part(plan: JobPlan) -> None:
    """An input without rows (a scheduled job's quiet day) still gives a finished output, with one
    part that holds no rows but every column, typed, so that readers find the table's schema."""
    fields = [plan.inputs.schema.field(c) for c in plan.settings.passthrough_columns]
    table = pa.schema(fields + output_columns(plan.rows_per_input_row)).empty_table()
    plan.output.write_part(EMPTY_INPUT_CHUNK, with_part_metadata(table, plan.fingerprint, EMPTY_INPUT_CHUNK))


def manifest(plan: JobPlan, totals: dict) -> dict:
    import ray
    import torch
    import transformers

    return {
        "lmbatch_version": lmbatch.__version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "fingerprint": plan.fingerprint,
        "input": {"uri": plan.inputs.uri, "rows": plan.inputs.num_rows,
                  "files": [{"path": io.with_scheme(plan.inputs.uri, f.path), "rows": f.num_rows, "bytes": f.size}
                            for f in plan.inputs.files]},
        "output": {"uri": plan.output.uri, "chunk_rows": plan.chunk_rows, **totals},
        # part -> the input rows it holds, as [file index, first row, stop row] ranges
        "parts": {c.id: [[p.file_index, p.start, p.stop] for p in c.pieces] for c in plan.chunks},
        "duplicate_id_rows": plan.num_duplicate_rows,
        "config": dataclasses.asdict(plan.job),
        "versions": {"lmbatch": lmbatch.__version__, "ray": ray.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__},
    }


def failure_cause(error: Exception) -> str:
    """One line on what failed in a Ray worker. Ray's report of it carries the worker's traceback,
    Python's chain of exceptions, root first: its first part ends with the worker's own
    `ErrorType: message` (what follows is Ray wrapping it)."""
    text = str(error)
    for wrapped in ("The above exception was the direct cause", "During handling of the above exception"):
        text = text.split(wrapped)[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = lines[-1] if lines else type(error).__name__
    if getattr(error, "actor_init_failed", False):
        return f"a replica could not start: {cause}"
    return f"a worker failed: {cause}"


@contextlib.contextmanager
def say_how_to_resume(plan: JobPlan):
    """When the job stops early, on Ctrl-C, SIGTERM (a scheduler stopping it: SystemExit, see
    ray_session) or a failure in Ray, say what is committed and how to go on, once Ray has shut down."""
    import ray

    def committed() -> str:
        done = len(plan.output.inspect(plan.fingerprint, "resume").done_chunks)
        return f"{done} of {len(plan.chunks)} chunks committed in {plan.output.uri}"

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        print(f"lmbatch: stopped with {committed()}; run the same command again to resume", file=sys.stderr)
        raise
    except ray.exceptions.RayError as e:
        # The worker's traceback: Ray Data prints it only when its exception reaches the console.
        log.error("the job failed in Ray:\n%s", e)
        print(f"lmbatch: failed with {committed()}; fix the cause below and run the same command again to resume",
              file=sys.stderr)
        raise JobFailed(failure_cause(e)) from e


def notices(plan: JobPlan) -> list[str]:
    """What the job says before it generates: warnings, and what a resumed job finds done."""
    job, uri, found = plan.job, plan.output.uri, []
    if plan.num_duplicate_rows:
        kept = "kept" if job.input.on_duplicate_id == "report" else "written as error rows"
        found.append(f"warning: {plan.num_duplicate_rows} rows repeat an earlier {job.input.id_column!r} value; "
                     f"they are {kept} (input.on_duplicate_id={job.input.on_duplicate_id})")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and io.is_inside(uri, os.getcwd()):  # `ray job submit`
        found.append(f"warning: output.path {uri} lies in the working directory Ray made for this submitted job, "
                     "which Ray may delete after it and other nodes do not see; set output.path to shared storage "
                     "or an object store")
    if not plan.chunks:
        found.append(f"warning: input.path {plan.inputs.uri} holds no rows; the output holds none either")
    if not plan.state.fresh:
        found.append(f"resuming {uri}: {len(plan.chunks) - len(plan.pending)} of {len(plan.chunks)} chunks "
                     "already committed")
    return found


def run(cfg: DictConfig | JobConfig) -> dict:
    """Run a job to a committed output; return its totals and metrics."""
    job = to_job_config(cfg)
    plan = plan_job(job)
    uri = plan.output.uri
    if plan.state.finished:
        print(f"lmbatch: {uri} already holds this job, finished (_SUCCESS); nothing to do. "
              "Use output.mode=overwrite to run it again.")
        return {"output": uri, "already_finished": True}
    if job.dry_run:
        from lmbatch.dry_run import dry_run

        return dry_run(plan)

    pending = plan.pending
    total_rows = plan.inputs.num_rows * plan.rows_per_input_row
    done_rows = (plan.inputs.num_rows - sum(c.num_rows for c in pending)) * plan.rows_per_input_row
    for line in notices(plan):
        print(f"lmbatch: {line}")
    plan.output.begin(plan.state, plan.fingerprint, plan.chunk_rows)
    progress = Progress(total_rows, done_rows, every_s=job.progress_every_s, replicas=plan.replicas)
    store_peak = None
    if pending:  # (object_store_bytes() runs once Ray is up: a with's managers are made in order)
        with say_how_to_resume(plan), ray_session(job), \
                PeakSampler(object_store_bytes(), interval=1.0) as store, live_progress(progress) as live_chunks:
            # No prefetch: it holds each chunk's summary back until the next chunk is done, so the
            # progress line ran a whole chunk behind (the summaries are a few bytes anyway).
            summaries = build_dataset(plan, live_chunks).iter_batches(batch_size=None, batch_format="pyarrow",
                                                                      prefetch_batches=0)
            for batch in summaries:
                progress.add(batch.to_pylist())
        store_peak = store.peak
    progress.print_line(final=True)
    if not plan.chunks:
        write_empty_part(plan)

    totals = count_committed(plan)
    metrics = {**progress.metrics(), "object_store_peak_mb": megabytes(store_peak)}
    plan.output.commit(manifest(plan, totals), {**totals, "duplicate_id_rows": plan.num_duplicate_rows, **metrics})
    print(f"lmbatch: wrote {totals['rows']:,} rows in {totals['parts']} parts to {uri}\n"
          + format_summary(metrics, totals))
    return {"output": uri, "already_finished": False, **totals, "metrics": metrics}
