"""One run at a time in an output: a lease that a running job renews and that another run waits on.

A scheduler may start a job while its previous run still goes on (a retry after a timeout, a
trigger fired twice). Rows would still land exactly once, as parts are whole and named by chunk,
but every pending chunk would be generated twice, and a run with `output.mode=overwrite` would
clear the other's parts under it. So a run holds `_lmbatch_run.json` in the output while it runs
and rewrites it every RENEW_S seconds. Another run waits until the file is gone, or has not changed
for EXPIRE_S seconds of its own clock (its holder was killed; no clocks of two machines are
compared), or at once when the holder ran on this machine and its process is gone. A run that is
stopped lets go of it as it ends, even when it is forced to exit without unwinding (`release_held`).
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Optional

from lmbatch.errors import JobError
from lmbatch.output.directory import LEASE_FILE, OutputDir
from lmbatch.retrying import until

RENEW_S = 10.0
EXPIRE_S = 60.0
SETTLE_S = 0.25
"""After writing the lease, read it back this much later: of two runs that took it at once, the one
whose write came last holds it, and the other goes back to waiting. Every run waits this long as it
starts, so it is short: a write takes milliseconds on a disk, tens of them on an object store."""

RELEASE_S = 10.0
"""The longest a run waits, as it ends, for the store to let go of its lease."""

_held: set["Lease"] = set()
"""The leases this process holds, for `release_held`."""


class Lease:
    def __init__(self, output: OutputDir):
        self.output = output
        self.record = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": now(),
                       "renewals": 0}
        # A release and a renewal (on the run's renewal thread) one at a time, and none after the release:
        # a renewal that came second would write the lease back after it was let go.
        self._lock = threading.Lock()
        self._released = False
        self._renewed = time.monotonic()
        self.lost: Optional[str] = None
        """Why the run lost its lease (a renewal the storage refused until the lease would lapse), or None."""

    def acquire(self, say: Callable[[str], None]) -> bool:
        """Take the lease, waiting while another run holds it; return whether it waited."""
        waited, seen, seen_since, announced = False, None, 0.0, None
        while True:
            held = self._read()
            stale = held == seen and time.monotonic() - seen_since >= EXPIRE_S
            if held is None or stale or process_gone(held):
                try:  # the output's first write
                    self.output.write_lease(json.dumps(self.record))
                except OSError as e:  # what the plan cannot see: no permission (an object store's policy)
                    raise JobError(f"output.path {self.output.uri} cannot be written: {e}") from None
                time.sleep(SETTLE_S)
                if self._read() == self.record:
                    self._renewed = time.monotonic()
                    _held.add(self)
                    return waited
                continue
            if held != seen:
                seen, seen_since = held, time.monotonic()
            if held["run"] != announced:
                announced = held["run"]
                done = f", {held['rows_done']:,} of {held['rows_total']:,} rows done" if "rows_done" in held else ""
                say(f"another run of this job (host {held['host']}, pid {held['pid']}, started {held['started']}"
                    f"{done}) is writing {self.output.uri}; waiting for it to end (or for its lease to lapse, "
                    f"{EXPIRE_S:g} s after it was last renewed)")
            waited = True
            time.sleep(RENEW_S / 2)

    def renew(self, status: Optional[dict] = None) -> None:
        """Called every RENEW_S seconds while the run goes on; `status` (rows done and in all) goes
        into the lease, for a run waiting on it and anyone watching the job. A renewal the storage fails
        is tried again (`retrying`) until the lease would lapse; one that cannot land by then stops the
        run (`lost`), as another run may take the output over."""
        with self._lock:
            if self._released:
                return
            deadline = self._renewed + EXPIRE_S - RENEW_S  # a margin for the clock of a run waiting on it
            try:
                with until(deadline):
                    self._renew(status or {})
                self._renewed = time.monotonic()
            except OSError as e:
                if time.monotonic() + RENEW_S >= deadline:  # the next renewal would come too late
                    self._lose(f"the run's lease {LEASE_FILE} in {self.output.uri} could not be renewed for "
                               f"{time.monotonic() - self._renewed:.0f} s ({e}); the run stops before it lapses, "
                               f"as another run would then take the output over")
                    raise

    def _lose(self, why: str) -> None:
        """Stop the run: the main thread is interrupted as by Ctrl-C, and `run` reports `lost`. A signal,
        not `_thread.interrupt_main`, which a main thread blocked on a lock (Ray Data's queue) never sees."""
        self.lost = why
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _renew(self, status: dict) -> None:
        if (self._read() or {}).get("run") != self.record["run"]:  # ours went unrenewed for EXPIRE_S
            print(f"lmbatch: warning: another run has taken over {self.output.uri}, as this run could not renew "
                  f"its lease there for {EXPIRE_S:g} s; both now generate what is pending (each row is still "
                  "written once)", file=sys.stderr)
            raise RuntimeError("lease taken over")  # ends the renewals
        self.record["renewals"] += 1
        self.record.update(status, renewed=now())
        self.output.write_lease(json.dumps(self.record))

    def release(self) -> None:
        with self._lock:
            self._released = True
            _held.discard(self)
            try:  # a store that does not answer now: the lease lapses by itself, EXPIRE_S after its last renewal
                with until(time.monotonic() + RELEASE_S):
                    if (self._read() or {}).get("run") == self.record["run"]:
                        self.output.delete_lease()
            except OSError:
                pass

    def _read(self) -> Optional[dict]:
        return read_lease(self.output)


def release_held(timeout: float) -> None:
    """Let go of the leases this process holds, before it exits without unwinding (forced, after a
    SIGTERM): a rerun on another machine then starts at once instead of waiting EXPIRE_S. Waits at most
    `timeout` seconds for each, as the storage may not answer (a hung mount)."""
    for lease in list(_held):
        letting_go = threading.Thread(target=lease.release, daemon=True)
        letting_go.start()
        letting_go.join(timeout)


def read_lease(output: OutputDir) -> Optional[dict]:
    """The lease a run holds in the output, or None."""
    for _ in range(5):
        text = output.read_lease()
        try:
            return None if text is None else json.loads(text)
        except ValueError:  # read as it was written (a local write is not atomic)
            time.sleep(0.2)
    raise JobError(f"{LEASE_FILE} in {output.uri} is not what lmbatch writes; delete it if no run of "
                   "this job is going on")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def process_gone(held: dict) -> bool:
    """Whether the holder ran on this machine and its process has ended (a killed run, restarted)."""
    if held["host"] != socket.gethostname():
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process
        return False
    return False
