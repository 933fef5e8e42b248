"""A replica's deaths, counted: while it loads (per replica) and on a chunk (across processes); a replica
that cannot see the output or the model directory says so.
"""


import socket

import pytest

from helpers.config import compose
from lmbatch.plan.job import to_job_config
from lmbatch.replica.actor import Replica, load_engine
from lmbatch.replica.faults import CRASHING_ROWS_PER_CHUNK, DEATHS_BEFORE_ISOLATING, check_load_deaths, isolating
from lmbatch.report.progress import LiveChunks


def test_a_node_without_the_model_directory_says_so(tmp_path):
    """The driver checks model.path on its own node; a replica on a node that lacks the directory
    names it and the node, instead of transformers taking the path for a hub id."""
    job = to_job_config(compose(f"model.path={tmp_path / 'model'}", f"output.path={tmp_path / 'out'}"))
    with pytest.raises(FileNotFoundError, match=f"model.path {tmp_path / 'model'} does not exist on "
                                                f"{socket.gethostname()}: a local model directory must exist"):
        load_engine(job, "cpu")


def test_a_replica_that_cannot_see_the_output_fails_at_start(tmp_path):
    """On a cluster whose nodes do not share output.path (a local directory on the driver's node),
    parts would be written where the driver never looks, and the job would fail only at its end."""
    job = to_job_config(compose(f"output.path={tmp_path / 'out'}"))
    with pytest.raises(RuntimeError, match=f"output.path {tmp_path / 'out'}, as replica \\S+ sees it, does not hold "
                                           "this job's _lmbatch_job.json.*storage every node shares"):
        Replica(job, str(tmp_path / "out"), ["id"], fingerprint="0123456789abcdef")


def test_deaths_while_loading_are_counted_per_replica_and_stop_only_a_job_with_none_loaded():
    """The counts behind the test above. While another replica has the model loaded the job goes on
    (Ray Data gives it the chunks) and the dying replica is only warned of."""
    live = LiveChunks()
    assert live.start_load("a") == (0, 0) and live.start_load("b") == (0, 0)
    assert live.start_load("a") == (1, 0)  # its process died loading: Ray started it again
    check_load_deaths(1, 0)
    live.replica_ready("b")
    assert live.start_load("a") == (2, 1)
    check_load_deaths(2, 1)  # b generates meanwhile
    live.start_load("b")  # b's process died generating: it loads again
    deaths, ready = live.start_load("a")
    with pytest.raises(RuntimeError, match="died 3 times in a row loading the model, and no replica has it"):
        check_load_deaths(deaths, ready)
    live.replica_ready("a")
    assert live.start_load("a") == (0, 0)  # a count of deaths in a row
    assert live.snapshot()[1] == 0


def test_deaths_on_a_chunk_are_counted_across_processes_and_bounded():
    """The counts behind the test above, which LiveChunks keeps for the replicas (it outlives them)."""
    live = LiveChunks()
    assert live.start_chunk("a") == (0, []) and live.start_chunk("b") == (0, [])
    assert live.start_chunk("a") == (1, [])  # its process died: Ray started it again
    live.row_started("a", 3)  # generated alone; the process dies on it
    assert live.start_chunk("a") == (2, [3])
    live.row_started("a", 4)
    live.row_started("a", None)  # all rows done, then the process died writing the part: no row to blame
    assert live.start_chunk("a") == (3, [3])
    assert [isolating("a", deaths) for deaths in range(DEATHS_BEFORE_ISOLATING + CRASHING_ROWS_PER_CHUNK + 1)] == (
        [False] * DEATHS_BEFORE_ISOLATING + [True] * (CRASHING_ROWS_PER_CHUNK + 1))
    with pytest.raises(RuntimeError, match="chunk a: 9 replica processes died generating it, 7 of them on its rows "
                                           "alone; so many point at the node or the model"):
        isolating("a", DEATHS_BEFORE_ISOLATING + CRASHING_ROWS_PER_CHUNK + 1)
