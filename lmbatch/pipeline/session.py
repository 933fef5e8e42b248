"""The Ray session a job runs in, and how a run stops: on SIGTERM (a scheduler's stop) like Ctrl-C, past
a grace period without Ray, and in every case saying what is committed and how to resume.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Callable

from lmbatch.config import JobConfig
from lmbatch.errors import JobFailed
from lmbatch.output.lease import release_held
from lmbatch.plan.job import JobPlan
from lmbatch.plan.resources import ray_address, starts_own_ray
from lmbatch.retrying import until

log = logging.getLogger(__name__)


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


COUNT_COMMITTED_S = 10.0
"""The longest a stopping run waits on the storage to count the chunks committed (it may be why it stops)."""


def committed(plan: JobPlan) -> str:
    try:
        with until(time.monotonic() + COUNT_COMMITTED_S):
            done = len(plan.output.inspect(plan.fingerprint, "resume").done_chunks)
    except OSError as e:
        return f"the chunks committed in {plan.output.uri} kept (they could not be counted now: {e})"
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
