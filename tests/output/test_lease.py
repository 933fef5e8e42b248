"""One run at a time in an output: the lease a running job renews and another run waits on.

The timings are shortened (renewal every 0.2 s, lapse after 1 s); the lease is the real one, in a
real output directory, and the other runs are real threads and processes.
"""

import json
import subprocess
import sys
import threading
import time

import pytest

from lmbatch.output import lease as lease_module
from lmbatch.output.directory import LEASE_FILE, OutputDir, OutputState
from lmbatch.output.lease import Lease


@pytest.fixture(autouse=True)
def short_timings(monkeypatch):
    monkeypatch.setattr(lease_module, "RENEW_S", 0.2)
    monkeypatch.setattr(lease_module, "EXPIRE_S", 1.0)
    monkeypatch.setattr(lease_module, "SETTLE_S", 0.05)


def held_by(output, **holder):
    record = {"run": "other", "host": "elsewhere", "pid": 1, "started": "2026-11-29T00:00:00+00:00",
              "renewals": 0, **holder}
    output.write_lease(json.dumps(record))


def test_a_lease_renewed_by_a_running_job_is_waited_on_until_it_ends(tmp_path):
    output = OutputDir(str(tmp_path / "out"))
    first, second, said = Lease(output), Lease(output), []
    assert first.acquire(said.append) is False and said == []
    status = {"rows_done": 1200, "rows_total": 5000}  # what its progress line last said
    first.renew(status)
    held = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
    assert held["rows_done"] == 1200 and held["rows_total"] == 5000 and held["renewed"] >= held["started"]
    stop = threading.Event()

    def run_for(seconds):  # the first run: renews its lease, then ends and releases it
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(lease_module.RENEW_S)
            first.renew(status)
        first.release()
        stop.set()
    threading.Thread(target=run_for, args=(2.5,)).start()  # well past EXPIRE_S: renewals keep it
    assert second.acquire(said.append) is True
    assert stop.is_set()  # it got the lease only once the first run had ended
    assert len(said) == 1 and said[0].startswith(f"another run of this job (host {first.record['host']}, pid ")
    assert f", 1,200 of 5,000 rows done) is writing {output.uri}; waiting for it to end" in said[0]
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["run"] == second.record["run"]
    second.release()
    assert not (tmp_path / "out" / LEASE_FILE).exists()


def test_a_lease_no_one_renews_lapses(tmp_path):
    """Its holder was killed on another machine: after EXPIRE_S unchanged, the lease is taken."""
    output = OutputDir(str(tmp_path / "out"))
    held_by(output)
    started = time.monotonic()
    said = []
    assert Lease(output).acquire(said.append) is True
    assert time.monotonic() - started >= lease_module.EXPIRE_S
    assert said == [f"another run of this job (host elsewhere, pid 1, started 2026-11-29T00:00:00+00:00) is writing "
                    f"{output.uri}; waiting for it to end (or for its lease to lapse, 1 s after it was last renewed)"]


def test_a_lease_of_a_process_gone_from_this_machine_is_taken_at_once(tmp_path):
    """A run killed here (kill -9, out of memory) and started again does not wait for the lapse."""
    output = OutputDir(str(tmp_path / "out"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held_by(output, host=Lease(output).record["host"], pid=int(gone.stdout))
    said = []
    assert Lease(output).acquire(said.append) is False and said == []


def test_a_lease_taken_over_ends_the_renewals_and_is_not_released_by_its_old_holder(tmp_path, capsys):
    output = OutputDir(str(tmp_path / "out"))
    mine = Lease(output)
    mine.acquire(print)
    held_by(output)  # its renewals could not reach the storage for EXPIRE_S, and another run took it
    with pytest.raises(RuntimeError, match="lease taken over"):
        mine.renew()
    assert "another run has taken over" in capsys.readouterr().err
    mine.release()
    assert json.loads((tmp_path / "out" / LEASE_FILE).read_text())["run"] == "other"


def test_a_released_lease_is_not_renewed_and_a_forced_exit_lets_go_of_it(tmp_path, capsys):
    """A renewal after the release (the renewal thread of a run that is stopping) neither writes the lease
    back nor warns of a take-over; release_held lets go of the leases this process holds (before a forced
    exit), and of no other run's."""
    output, elsewhere = OutputDir(str(tmp_path / "out")), OutputDir(str(tmp_path / "other"))
    mine = Lease(output)
    mine.acquire(print)
    held_by(elsewhere)
    lease_module.release_held(timeout=5)
    assert not (tmp_path / "out" / LEASE_FILE).exists() and (tmp_path / "other" / LEASE_FILE).exists()
    mine.renew({"rows_done": 1})
    assert not (tmp_path / "out" / LEASE_FILE).exists() and "taken over" not in capsys.readouterr().err
    lease_module.release_held(timeout=5)  # none held now


def test_the_lease_is_not_part_of_the_output(tmp_path):
    """A directory holding only another run's lease is that run's new output, not foreign data;
    starting or overwriting the output keeps this run's lease."""
    output = OutputDir(str(tmp_path / "out"))
    held_by(output)
    assert output.inspect("0123456789abcdef", "resume") == OutputState()
    (tmp_path / "out" / "part-00000-000000000.parquet").write_text("an overwritten job's part")
    output.begin(OutputState(), "0123456789abcdef", 4)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_lmbatch_job.json", LEASE_FILE]
