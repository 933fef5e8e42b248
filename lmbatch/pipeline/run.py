"""The job: plan everything up front, then read -> prepare -> replica pool -> commit with Ray Data.

    plan_job   (lmbatch.plan) inputs, model and output are checked before Ray starts or any model loads;
               the input is cut into chunks and the chunks already committed are skipped
    Ray Data   one block per pending chunk -> prepare (CPU tasks) -> Replica actors, which
               generate and write each chunk's part, returning one summary row per chunk
    commit     every planned part is checked (rows exactly once), then _manifest.json,
               _metrics.json and, last, _SUCCESS
"""

from __future__ import annotations

import functools
import logging

from omegaconf import DictConfig

from lmbatch.config import JobConfig
from lmbatch.errors import JobFailed
from lmbatch.output.lease import RENEW_S, Lease
from lmbatch.pipeline.commit import count_committed, manifest, write_empty_part
from lmbatch.pipeline.dataset import build_dataset, live_progress
from lmbatch.pipeline.notices import say, say_notices
from lmbatch.pipeline.session import ray_session, say_how_to_resume, say_stopped
from lmbatch.plan.job import JobPlan, plan_job, to_job_config
from lmbatch.plan.resources import check_cluster
from lmbatch.report.progress import Progress
from lmbatch.report.samplers import PeakSampler, Periodic, object_store_bytes
from lmbatch.report.summary import by_kind, format_summary, megabytes
from lmbatch.retrying import take_counts

log = logging.getLogger(__name__)


# -- execution ---------------------------------------------------------------------------------


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
    except KeyboardInterrupt:
        if lease.lost:  # the renewals interrupted the run: say why
            raise JobFailed(lease.lost) from None
        raise
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
    progress.storage_retries.update(take_counts())  # the driver's own: the plan, the lease, the checks above
    metrics = {"engine": job.engine, **progress.metrics(), "object_store_peak_mb": megabytes(store_peak)}
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
