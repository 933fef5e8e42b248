"""`lmbatch-status OUTPUT`: what an output holds, read from the output alone (no config needed, any
URI the job takes): finished, being written by a run (how far it has got, from the run's lease),
stalled (a run that went away without releasing its lease) or partial. For a person, a few lines; for
a scheduler's sensor, `--json` and the exit status: 0 finished, 1 not yet, 2 no lmbatch output there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Optional

import pyarrow.fs as pafs

from lmbatch.errors import JobError
from lmbatch.output.directory import CHUNK_MARKERS, METRICS, STATE_FILE, SUCCESS, OutputDir
from lmbatch.output.lease import EXPIRE_S, process_gone, read_lease
from lmbatch.report.summary import by_kind
from lmbatch.storage import absolute

TOTALS = ("rows", "rows_ok", "rows_error", "rows_error_by_kind", "parts")


def output_status(uri: str, clock: Optional[datetime.datetime] = None) -> dict:
    """The output's state (`finished`, `running`, `stalled`, `partial` or `absent`) and what it holds."""
    out = OutputDir(absolute(uri))
    status = {"output": out.uri}
    if out.fs.get_file_info(out.path).type != pafs.FileType.Directory or STATE_FILE not in (names := out.names()):
        return {**status, "state": "absent"}
    job = out.read_json(STATE_FILE)
    status.update(job=job["fingerprint"], model=job.get("model"), chunk_rows=job["chunk_rows"],
                  chunks_done=len(out.done_chunks(partitioned=CHUNK_MARKERS in names)))
    if SUCCESS in names:
        totals = out.read_json(METRICS)
        return {**status, "state": "finished", **{k: totals[k] for k in TOTALS}}
    lease = read_lease(out)
    if lease is None:
        return {**status, "state": "partial"}
    clock = clock or datetime.datetime.now(datetime.timezone.utc)
    age = (clock - datetime.datetime.fromisoformat(lease.get("renewed", lease["started"]))).total_seconds()
    # The lease's times are its holder's clock, compared with this one's: skew shifts when one elsewhere looks gone.
    gone = process_gone(lease) or age > EXPIRE_S
    run = {k: lease.get(k) for k in ("host", "pid", "started", "renewed", "rows_done", "rows_total")}
    return {**status, "state": "stalled" if gone else "running", "run": run, "lease_age_s": round(age)}


def describe(s: dict) -> str:
    """A few lines for a person."""
    state, head = s["state"], f"{s['output']}: "
    if state == "absent":
        return head + "no lmbatch output there"
    identity = f"  job {s['job']}, model {s['model'] or 'not recorded'}"
    if state == "finished":
        return (head + f"finished: {s['rows']:,} rows in {s['parts']:,} parts, {s['rows_ok']:,} ok and "
                f"{s['rows_error']:,} error rows (errors by kind: {by_kind(s['rows_error_by_kind'])})\n" + identity)
    committed = f"{s['chunks_done']:,} chunks of up to {s['chunk_rows']:,} rows committed"
    if state == "partial":
        return head + f"partial: {committed}; no run is writing it: run the job again to resume it\n" + identity
    run = s["run"]
    rows = f"{run['rows_done']:,} of {run['rows_total']:,} rows done" if run.get("rows_total") is not None else ""
    who = f"host {run['host']}, pid {run['pid']}, started {run['started']}"
    if state == "running":
        return (head + f"running ({who}){', ' + rows if rows else ''}; {committed}; lease renewed "
                f"{s['lease_age_s']} s ago\n" + identity)
    return (head + f"stalled: its run ({who}) last renewed its lease {s['lease_age_s']} s ago and is likely gone"
            f"{'; ' + rows + ' when it last said' if rows else ''}; {committed}: run the job again to resume it "
            "(it takes the lease over)\n" + identity)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lmbatch-status", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="an output.path: a directory or a URI such as s3://bucket/out")
    parser.add_argument("--json", action="store_true", help="print the status as one JSON object")
    args = parser.parse_args(argv)
    try:
        s = output_status(args.output)
    except (JobError, OSError, ValueError) as e:
        print(f"lmbatch-status: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(s) if args.json else describe(s))
    return {"finished": 0, "absent": 2}.get(s["state"], 1)


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
