"""A replica's faults: generation that hangs ends its process (`StallWatchdog`), a chunk whose processes
keep dying is generated a row at a time to find the row that kills them (`isolating`), and a replica that
cannot load its model stops the job rather than restart without end (`check_load_deaths`).
"""

from __future__ import annotations

import faulthandler
import logging
from typing import Optional

log = logging.getLogger(__name__)


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
