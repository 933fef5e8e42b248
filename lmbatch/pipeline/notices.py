"""What a job says before it generates: warnings (repeated ids, an output Ray may delete, memory), and
what a resumed or retrying run finds done.
"""

from __future__ import annotations

import collections
import os

from lmbatch.plan.job import JobPlan
from lmbatch.plan.resources import memory_shortfall_here
from lmbatch.storage import is_inside


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
