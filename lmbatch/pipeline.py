"""The job: plan everything up front, then read -> prepare -> replica pool -> commit with Ray Data.

    plan_job   (lmbatch.plan) inputs, model and output are checked before Ray starts or any model loads;
               the input is cut into chunks and the chunks already committed are skipped
    Ray Data   one block per pending chunk -> prepare (CPU tasks) -> Replica actors, which
               generate and write each chunk's part, returning one summary row per chunk
    commit     every planned part is checked (rows exactly once), then _manifest.json,
               _metrics.json and, last, _SUCCESS
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Callable, Optional

import pyarrow as pa
from omegaconf import DictConfig

import lmbatch
from lmbatch.config import JobConfig
from lmbatch.errors import JobFailed, error_kind
from lmbatch.input.chunks import Chunk
from lmbatch.output.columns import output_columns
from lmbatch.output.directory import with_part_metadata
from lmbatch.output.lease import RENEW_S, Lease, release_held
from lmbatch.plan.job import JobPlan, plan_job, to_job_config
from lmbatch.plan.resources import check_cluster, memory_shortfall_here, ray_address, starts_own_ray
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import PrepareSettings
from lmbatch.replica.actor import Replica
from lmbatch.report.progress import LiveChunks, Progress
from lmbatch.report.samplers import PeakSampler, Periodic, object_store_bytes
from lmbatch.report.summary import by_kind, format_summary, megabytes
from lmbatch.storage import is_inside, with_scheme

log = logging.getLogger(__name__)


# -- execution ---------------------------------------------------------------------------------
@contextlib.contextmanager
def ray_session(job: JobConfig, say_stopped: Callable[[], None]):
    """Attach to `cluster.address` / RAY_ADDRESS, or start a local Ray bound to loopback; yield whether
    it did the latter. On SIGTERM, unwind like Ctrl-C; `say_stopped` is called if that takes longer
    than STOP_GRACE_S (below)."""
    import ray

    if ray.is_initialized():  # the caller (a test, a notebook) owns Ray
        yield False
        return
    address = ray_address(job)
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
        signal.signal(signal.SIGTERM, functools.partial(_exit_on_sigterm, say_stopped))
    try:
        yield starts_own_ray(job)
    finally:
        ray.shutdown()
        if main_thread:
            signal.signal(signal.SIGTERM, on_sigterm)


# Schedulers send SIGKILL 30 s after SIGTERM (Slurm's KillWait, Kubernetes' grace period).
STOP_GRACE_S = 20.0
LEASE_RELEASE_S = 5.0
"""How long a forced exit waits for the storage to let go of the run's lease (then it lapses in EXPIRE_S)."""


def _exit_on_sigterm(say_stopped: Callable[[], None], signum, frame):
    """Unwind like Ctrl-C: Ray shuts down, then the job says how to resume. A scheduler that stops a
    job signals every process in it (Slurm, systemd), Ray's own included, and Ray then waits a
    minute for its dead GCS, in its shutdown or in Ray Data's: past STOP_GRACE_S, say it and exit."""
    signal.signal(signum, signal.SIG_IGN)  # stopping already; a second SIGTERM would cut the unwinding short
    # Said at once: shutting down takes seconds, and at times Ray ends this process before it can say more.
    print("lmbatch: SIGTERM received: stopping (what is committed is kept)", file=sys.stderr, flush=True)
    threading.Thread(target=_exit_after_grace, args=(say_stopped, 128 + signum), daemon=True).start()
    raise SystemExit(128 + signum)


def _exit_after_grace(say_stopped: Callable[[], None], status: int):
    time.sleep(STOP_GRACE_S)
    log.warning("Ray did not shut down within %g s of SIGTERM; exiting without it", STOP_GRACE_S)
    release_held(timeout=LEASE_RELEASE_S)  # what run() would do as it unwound
    say_stopped()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


class ReadStalled(RuntimeError):
    """A chunk's read and prepare did not finish within cluster.stall_timeout_s."""


def _prepare_batch(descriptors: pa.Table, settings: PrepareSettings, timeout_s: Optional[float] = None) -> pa.Table:
    tables = []
    for d in descriptors.to_pylist():
        duplicates = d.pop("duplicate_rows")
        tables.append(prepare_within(Chunk.from_dict(d), settings, duplicates, timeout_s))
    return pa.concat_tables(tables)


def prepare_within(chunk: Chunk, settings: PrepareSettings, duplicates: list[int], timeout_s: Optional[float]):
    """prepare_chunk, given up after `timeout_s`: a read from a hung mount never returns, and the job
    would wait for the chunk forever without a word. It runs on a thread of its own, which is left
    blocked: the job stops, and Ray's shutdown ends the process."""
    if not timeout_s:
        return prepare_chunk(chunk, settings, duplicates)
    done: dict = {}

    def prepare() -> None:
        try:
            done["table"] = prepare_chunk(chunk, settings, duplicates)
        except BaseException as e:  # noqa: BLE001 - raised again below, in the task's own thread
            done["error"] = e
    thread = threading.Thread(target=prepare, name=f"prepare {chunk.id}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        files = ", ".join(sorted({with_scheme(settings.input_uri, p.file) for p in chunk.pieces}))
        raise ReadStalled(f"reading chunk {chunk.id} of the input ({files}) did not finish within "
                          f"cluster.stall_timeout_s={timeout_s:g} s: is its storage hung (a stale mount)? The job "
                          "stops rather than wait for it forever")
    if "error" in done:
        raise done["error"]
    return done["table"]


def build_dataset(plan: JobPlan, live_chunks=None):
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ray.data.DataContext.get_current().enable_progress_bars = False  # lmbatch prints its own
    # ...and Ray Data's warning on that, telling how to turn its bars back on, would only confuse.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    job, pending, replicas = plan.job, plan.pending, plan.replicas
    # One block per chunk: every replica gets work and a chunk never spans two replicas.
    items = [{**dataclasses.asdict(c), "duplicate_rows": plan.error_duplicates(c.id)} for c in pending]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # No more prepare tasks at once than replicas, which take one chunk at a time: each task's worker
    # process loads the tokenizer (transformers, torch: ~4 s of CPU), so more only start processes
    # that compete with the replicas' own start-up (a 2-core job started in 22 s instead of 28).
    ds = ds.map_batches(_prepare_batch, fn_kwargs={"settings": plan.settings,
                                                   "timeout_s": job.cluster.stall_timeout_s}, batch_size=1,
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
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: replicas ask it how often each chunk was started, and must outlive any
    # node lost but the driver's (which ends the job anyway).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    live_chunks = ray.remote(num_cpus=0, scheduling_strategy=here)(LiveChunks).remote()

    def poll():
        try:
            progress.update_live(*ray.get(live_chunks.snapshot.remote(), timeout=10))
        except ray.exceptions.RayError:  # the line still counts the finished chunks
            pass

    def tick():
        poll()
        progress.print_line()

    try:
        with Periodic(tick, progress.every_s):
            yield live_chunks
        poll()  # the last count of chunks restarted, for the summary (a stopped job prints none)
    finally:
        ray.kill(live_chunks)


def count_committed(plan: JobPlan) -> dict:
    """Check that every planned chunk has its part with exactly its rows; count ok and error rows, and
    the error rows of each kind (over the whole output: a resumed run's own count has only its own)."""
    files = plan.output.part_files()
    missing = [c.id for c in plan.chunks if c.id not in files]
    if missing:
        raise JobFailed(f"parts for chunks {missing[:5]} are missing after the run (was the output changed while "
                        "the job ran?); run the same command again to generate them")
    rows, kinds = 0, collections.Counter()
    counted = plan.output.errors((c.id for c in plan.chunks), files)
    for chunk in plan.chunks:
        found, errors = counted[chunk.id]
        expected = chunk.num_rows * plan.rows_per_input_row
        if found != expected:
            raise JobFailed(f"parts of chunk {chunk.id} hold {found} rows, expected {expected}: delete "
                            f"{', '.join(files[chunk.id])} and run the same command again to generate the chunk anew")
        rows += found
        kinds.update(map(error_kind, errors))
    error = sum(kinds.values())
    return {"rows": rows, "rows_ok": rows - error, "rows_error": error, "rows_error_by_kind": dict(kinds.most_common()),
            "parts": sum(map(len, files.values()))}


EMPTY_INPUT_CHUNK = "00000-000000000"  # the id of the chunk that would begin at the first row


def write_empty_part(plan: JobPlan) -> None:
    """An input without rows (a scheduled job's quiet day) still gives a finished output, with one
    part that holds no rows but every column, typed, so that readers find the table's schema."""
    fields = [plan.inputs.schema.field(c) for c in plan.settings.passthrough_columns]
    table = pa.schema(fields + output_columns(plan.job)).empty_table()
    plan.output.write_part(EMPTY_INPUT_CHUNK, with_part_metadata(table, plan.fingerprint, EMPTY_INPUT_CHUNK))


def manifest(plan: JobPlan, totals: dict) -> dict:
    import ray
    import torch
    import transformers

    return {
        "lmbatch_version": lmbatch.__version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "fingerprint": plan.fingerprint,
        "model_identity": plan.model_identity,
        "input": {"uri": plan.inputs.uri, "rows": plan.inputs.num_rows,
                  "files": [{"path": with_scheme(plan.inputs.uri, f.path), "rows": f.num_rows, "bytes": f.size}
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
    # The exception's type without its module (`lmbatch.errors.JobError: ...` -> `JobError: ...`).
    cause = re.sub(r"^[\w.]+\.(?=\w+: )", "", lines[-1]) if lines else type(error).__name__
    if getattr(error, "actor_init_failed", False):
        return f"a replica could not start: {cause}"
    return f"a worker failed: {cause}"


def committed(plan: JobPlan) -> str:
    done = len(plan.output.inspect(plan.fingerprint, "resume").done_chunks)
    return f"{done} of {len(plan.chunks)} chunks committed in {plan.output.uri}"


def say_stopped(plan: JobPlan) -> None:
    print(f"lmbatch: stopped with {committed(plan)}; run the same command again to resume", file=sys.stderr)


@contextlib.contextmanager
def say_how_to_resume(plan: JobPlan):
    """When the job stops early, on Ctrl-C, SIGTERM (a scheduler stopping it: SystemExit, see
    ray_session) or a failure in Ray, say what is committed and how to go on, once Ray has shut down."""
    import ray

    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        say_stopped(plan)
        raise
    except ray.exceptions.RayError as e:
        # The worker's traceback: Ray Data prints it only when its exception reaches the console.
        log.error("the job failed in Ray:\n%s", e)
        print(f"lmbatch: failed with {committed(plan)}; fix the cause below and run the same command again to resume",
              file=sys.stderr)
        raise JobFailed(failure_cause(e)) from e


# Rows done in a run before its share of error rows can stop it: a first chunk that happens to hold
# most of a table's bad rows should not stop a job whose rows mostly succeed.
ERROR_CHECK_MIN_ROWS = 1000
TOO_MANY_ERRORS = ("The error column of the parts says why each row failed (dry_run=true shows the first few). Fix "
                   "the cause and run the same command again (with output.mode=overwrite if the fix changes the job), "
                   "or raise output.max_error_fraction to accept such rows.")


def check_errors_so_far(plan: JobPlan, progress: Progress) -> None:
    """Stop a job whose rows mostly fail (a template naming the wrong column, a model that fails every
    row) once ERROR_CHECK_MIN_ROWS rows are done in this run, rather than write millions of error rows."""
    output, rows, errors = plan.job.output, progress.sums["rows"], progress.sums["errors"]
    if rows >= ERROR_CHECK_MIN_ROWS and output.too_many_errors(rows, errors):
        kinds = by_kind(dict(progress.error_kinds.most_common()), most=3)
        raise JobFailed(f"stopped: {errors:,} of the {rows:,} rows done in this run are error rows "
                        f"({errors / rows:.1%}; {kinds}), over output.max_error_fraction={output.max_error_fraction}; "
                        f"the chunks committed in {plan.output.uri} are kept. {TOO_MANY_ERRORS}")


def say(line: str) -> None:
    print(f"lmbatch: {line}", flush=True)


def say_notices(plan: JobPlan) -> None:
    for line in notices(plan):
        say(line)


def notices(plan: JobPlan) -> list[str]:
    """What the job says before it generates: warnings, and what a resumed job finds done."""
    job, uri, found = plan.job, plan.output.uri, []
    if n := plan.num_duplicate_rows:
        mode = job.input.on_duplicate_id
        kept = "kept" if mode == "report" else f"written as {'an error row' if n == 1 else 'error rows'}"
        found.append(f"warning: {n:,} {'row repeats' if n == 1 else 'rows repeat'} an earlier {job.input.id_column!r} "
                     f"value; {'it is' if n == 1 else 'they are'} {kept} (input.on_duplicate_id={mode})")
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") and is_inside(uri, os.getcwd()):  # `ray job submit`
        found.append(f"warning: output.path {uri} lies in the working directory Ray made for this submitted job, "
                     "which Ray may delete after it and other nodes do not see; set output.path to shared storage "
                     "or an object store")
    if shortfall := memory_shortfall_here(job):
        found.append(f"warning: {shortfall}")
    if not plan.chunks:
        found.append(f"warning: input.path {plan.inputs.uri} holds no rows; the output holds none either")
    if plan.retrying:
        kinds = sum(plan.retrying.values(), collections.Counter())
        found.append(f"retrying the rows that failed in generation in {uri} "
                     f"({', '.join(f'{kind}: {n:,}' for kind, n in sorted(kinds.items()))}), with the rest of "
                     f"their chunks: {len(plan.pending)} of {len(plan.chunks)} chunks to generate, "
                     f"{len(plan.chunks) - len(plan.pending)} kept")
    elif not plan.state.fresh:
        found.append(f"resuming {uri}: {len(plan.chunks) - len(plan.pending)} of {len(plan.chunks)} chunks "
                     "already committed")
    return found


def run(cfg: DictConfig | JobConfig) -> dict:
    """Run a job to a committed output; return its totals and metrics."""
    job = to_job_config(cfg)
    plan = plan_job(job)
    if plan.state.finished:
        return already_finished(plan)
    if job.dry_run:
        from lmbatch.plan.dry_run import dry_run

        say_notices(plan)
        return dry_run(plan)
    lease = Lease(plan.output)
    waited = lease.acquire(say)
    try:
        if waited:  # what the other run did changes the plan: it may have finished the job
            plan = plan_job(job)
            if plan.state.finished:
                return already_finished(plan)
        say_notices(plan)
        progress = job_progress(plan)
        # The lease tells how far the run has got: to a run waiting on it, and to anyone who reads it.
        with Periodic(lambda: lease.renew(progress.status()), RENEW_S):
            return generate(plan, progress)
    finally:
        lease.release()


def already_finished(plan: JobPlan) -> dict:
    changed = (" It was made, all of it, with the model files model.path held then, not those it holds "
               "now.") if plan.state.model_changed else ""
    retry = " (output.mode=retry_errors: no row failed in generation)" if plan.job.output.mode == "retry_errors" else ""
    print(f"lmbatch: {plan.output.uri} already holds this job, finished (_SUCCESS); nothing to do{retry}.{changed} "
          "Use output.mode=overwrite to run it again.")
    return {"output": plan.output.uri, "already_finished": True}


def job_progress(plan: JobPlan) -> Progress:
    total_rows = plan.inputs.num_rows * plan.rows_per_input_row
    done_rows = (plan.inputs.num_rows - sum(c.num_rows for c in plan.pending)) * plan.rows_per_input_row
    g, columns = plan.job.generation, plan.job.input.param_columns
    # rows of choices generate whatever max_new_tokens says
    generates = bool(g.max_new_tokens or g.choices or {"max_new_tokens", "choices"} & set(columns))
    return Progress(total_rows, done_rows, every_s=plan.job.progress_every_s, replicas=plan.replicas,
                    generates=generates)


def generate(plan: JobPlan, progress: Progress) -> dict:
    """Generate a planned job's pending chunks, under its lease, and commit the output."""
    job, uri = plan.job, plan.output.uri
    pending = plan.pending
    store_peak = None
    if not pending:
        plan.begin_output()
    else:
        with say_how_to_resume(plan), ray_session(job, functools.partial(say_stopped, plan)) as local:
            check_cluster(plan, local)
            plan.begin_output()
            with PeakSampler(object_store_bytes(), interval=1.0) as store, live_progress(progress) as live_chunks:
                # No prefetch: it holds each chunk's summary back until the next chunk is done, so the
                # progress line ran a whole chunk behind (the summaries are a few bytes anyway).
                summaries = build_dataset(plan, live_chunks).iter_batches(batch_size=None, batch_format="pyarrow",
                                                                          prefetch_batches=0)
                for batch in summaries:
                    progress.add(batch.to_pylist())
                    check_errors_so_far(plan, progress)
        store_peak = store.peak
    progress.print_line(final=True)
    if not plan.chunks:
        write_empty_part(plan)

    totals = count_committed(plan)
    metrics = {**progress.metrics(), "object_store_peak_mb": megabytes(store_peak)}
    summary = format_summary(metrics, totals, job.held_to_pattern)
    if job.output.too_many_errors(totals["rows"], totals["rows_error"]):
        print(summary)
        kinds = by_kind(totals["rows_error_by_kind"], most=3)
        raise JobFailed(f"{totals['rows_error']:,} of the {totals['rows']:,} rows in {uri} are error rows "
                        f"({totals['rows_error'] / totals['rows']:.1%}; {kinds}), over output.max_error_fraction="
                        f"{job.output.max_error_fraction}: every row is written, but the output is not marked "
                        f"finished (no _SUCCESS). {TOO_MANY_ERRORS}")
    plan.output.commit(manifest(plan, totals), {**totals, "duplicate_id_rows": plan.num_duplicate_rows, **metrics})
    print(f"lmbatch: wrote {totals['rows']:,} rows in {totals['parts']} parts to {uri}\n" + summary)
    return {"output": uri, "already_finished": False, **totals, "metrics": metrics}
