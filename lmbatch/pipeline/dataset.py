"""The Ray Data dataset of a job: one block per pending chunk, read and prepared by CPU tasks (given up on
after cluster.stall_timeout_s), generated and written by the replica actors; and the live progress actor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
from typing import Optional

import pyarrow as pa

from lmbatch.input.chunks import Chunk
from lmbatch.plan.job import JobPlan
from lmbatch.prepare.chunk import prepare_chunk
from lmbatch.prepare.settings import READ_RETRIES, PrepareSettings
from lmbatch.replica.actor import Replica
from lmbatch.report.progress import LiveChunks, Progress
from lmbatch.report.samplers import Periodic
from lmbatch.retrying import RetryPolicy, set_policy, take_counts
from lmbatch.storage import with_scheme


class ReadStalled(RuntimeError):
    """A chunk's read and prepare did not finish within cluster.stall_timeout_s."""


def _prepare_batch(descriptors: pa.Table, settings: PrepareSettings, storage: RetryPolicy,
                   timeout_s: Optional[float] = None) -> pa.Table:
    set_policy(storage)
    tables = []
    for d in descriptors.to_pylist():
        duplicates = d.pop("duplicate_rows")
        tables.append(prepare_within(Chunk.from_dict(d), settings, duplicates, timeout_s))
    prepared = pa.concat_tables(tables)
    # the retries its reads made, counted by the replica that generates the chunk (this task returns rows)
    return prepared.replace_schema_metadata({**(prepared.schema.metadata or {}),
                                             READ_RETRIES: json.dumps(take_counts()).encode()})


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
    ds = ds.map_batches(_prepare_batch, fn_kwargs={"settings": plan.settings, "storage": job.storage.policy,
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
