"""`lmbatch-status`: an output's state read from the output alone. The outputs here are laid out as a
job leaves them at each stage (the files a finished job writes are checked against a real job in
test_e2e); the command runs as installed, as a scheduler's sensor would run it."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from lmbatch.output.lease import EXPIRE_S
from lmbatch.status import describe, main, output_status

STARTED = datetime.datetime(2026, 12, 1, 1, 0, tzinfo=datetime.timezone.utc)


def partial_output(path, parts=2):
    path.mkdir()
    (path / "_lmbatch_job.json").write_text(json.dumps({"fingerprint": "0db4b980950a278f", "chunk_rows": 75,
                                                        "model": "content 0c3a7c54ef54e491"}))
    for i in range(parts):
        pq.write_table(pa.table({"id": [i]}), path / f"part-00000-{75 * i:09d}.parquet")
    return path


def lease(path, host, pid, renewed):
    (path / "_lmbatch_run.json").write_text(json.dumps({
        "run": "r", "host": host, "pid": pid, "started": STARTED.isoformat(), "renewals": 3,
        "rows_done": 150, "rows_total": 300, "renewed": renewed.isoformat()}))


def test_each_state_of_an_output(tmp_path, capsys):
    assert output_status(str(tmp_path / "none"))["state"] == "absent"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("a,b\n")
    assert main([str(tmp_path / "other")]) == 2
    assert capsys.readouterr().out == f"{tmp_path / 'other'}: no lmbatch output there\n"

    out = partial_output(tmp_path / "out")
    assert main([str(out)]) == 1
    assert capsys.readouterr().out.startswith(f"{out}: partial: 2 chunks of up to 75 rows committed; no run is "
                                              "writing it: run the job again to resume it\n  job 0db4b980950a278f")

    # A run elsewhere that renewed its lease 4 s ago is running; one past EXPIRE_S is likely gone.
    lease(out, "another-host", 1, STARTED + datetime.timedelta(seconds=30))
    running = output_status(str(out), clock=STARTED + datetime.timedelta(seconds=34))
    assert (running["state"], running["lease_age_s"], running["run"]["rows_done"]) == ("running", 4, 150)
    assert describe(running).startswith(
        f"{out}: running (host another-host, pid 1, started 2026-12-01T01:00:00+00:00), 150 of 300 rows done; "
        "2 chunks of up to 75 rows committed; lease renewed 4 s ago")
    stalled = output_status(str(out), clock=STARTED + datetime.timedelta(seconds=31 + EXPIRE_S))
    assert stalled["state"] == "stalled"
    assert "likely gone; 150 of 300 rows done when it last said; 2 chunks" in describe(stalled)
    # On this machine, a holder whose process has ended is gone at once.
    finished_process = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                      text=True).stdout.strip()
    lease(out, socket.gethostname(), int(finished_process), datetime.datetime.now(datetime.timezone.utc))
    assert output_status(str(out))["state"] == "stalled"

    (out / "_lmbatch_run.json").unlink()
    (out / "_metrics.json").write_text(json.dumps({"rows": 150, "rows_ok": 148, "rows_error": 2, "parts": 2,
                                                   "rows_error_by_kind": {"too long": 2}, "wall_seconds": 9.0}))
    (out / "_SUCCESS").write_text("")
    script = shutil.which("lmbatch-status", path=os.path.dirname(sys.executable))  # as installed
    done = subprocess.run([script, "--json", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"output": str(out), "state": "finished", "job": "0db4b980950a278f",
                                       "model": "content 0c3a7c54ef54e491", "chunk_rows": 75, "chunks_done": 2,
                                       "rows": 150, "rows_ok": 148, "rows_error": 2,
                                       "rows_error_by_kind": {"too long": 2}, "parts": 2}
    assert describe(json.loads(done.stdout)).startswith(
        f"{out}: finished: 150 rows in 2 parts, 148 ok and 2 error rows (errors by kind: too long: 2)")


def test_a_partitioned_output_counts_the_chunks_its_markers_record(tmp_path):
    """With output.partition_by a chunk is done once its marker is written, after its parts in every
    partition: a chunk whose parts are there but not its marker is not."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lmbatch_job.json").write_text(json.dumps({"fingerprint": "f", "chunk_rows": 10, "model": None}))
    for value in ("a", "b"):
        (out / f"topic={value}").mkdir()
        for chunk in ("00000-000000000", "00000-000000010"):
            pq.write_table(pa.table({"id": [1]}), out / f"topic={value}" / f"part-{chunk}.parquet")
    (out / "_chunks").mkdir()
    (out / "_chunks" / "00000-000000000").write_text("")
    status = output_status(str(out))
    assert (status["state"], status["chunks_done"], status["model"]) == ("partial", 1, None)
    assert describe(status).endswith("job f, model not recorded")
