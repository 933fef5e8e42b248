"""The commit of a job's output: every planned part checked (rows exactly once), the empty part of an input
without rows, and the manifest written before `_SUCCESS`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime

import pyarrow as pa

import lmbatch
from lmbatch.errors import JobFailed, error_kind
from lmbatch.output.columns import output_columns
from lmbatch.output.directory import with_part_metadata
from lmbatch.plan.job import JobPlan
from lmbatch.storage import with_scheme


def count_committed(plan: JobPlan) -> dict:
    """Check that every planned chunk has its part with exactly its rows; count ok and error rows, and
    the error rows of each kind (over the whole output: a resumed run's own count has only its own)."""
    files = plan.output.part_files()
    missing = [c.id for c in plan.chunks if c.id not in files]
    if missing:
        raise JobFailed(f"parts for chunks {missing[:5]} are missing after the run (was the output changed while "
                        "the job ran?); run the same command again to generate them")
    rows, kinds = 0, collections.Counter()
    counted = plan.output.errors((c.id for c in plan.chunks), files)
    for chunk in plan.chunks:
        found, errors = counted[chunk.id]
        expected = chunk.num_rows * plan.rows_per_input_row
        if found != expected:
            raise JobFailed(f"parts of chunk {chunk.id} hold {found} rows, expected {expected}: delete "
                            f"{', '.join(files[chunk.id])} and run the same command again to generate the chunk anew")
        rows += found
        kinds.update(map(error_kind, errors))
    error = sum(kinds.values())
    return {"rows": rows, "rows_ok": rows - error, "rows_error": error, "rows_error_by_kind": dict(kinds.most_common()),
            "parts": sum(map(len, files.values()))}


EMPTY_INPUT_CHUNK = "00000-000000000"  # the id of the chunk that would begin at the first row


def write_empty_part(plan: JobPlan) -> None:
    """An input without rows (a scheduled job's quiet day) still gives a finished output, with one
    part that holds no rows but every column, typed, so that readers find the table's schema."""
    fields = [plan.inputs.schema.field(c) for c in plan.settings.passthrough_columns]
    table = pa.schema(fields + output_columns(plan.job)).empty_table()
    plan.output.write_part(EMPTY_INPUT_CHUNK, with_part_metadata(table, plan.fingerprint, EMPTY_INPUT_CHUNK))


def manifest(plan: JobPlan, totals: dict) -> dict:
    import ray
    import torch
    import transformers

    return {
        "lmbatch_version": lmbatch.__version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "fingerprint": plan.fingerprint,
        "model_identity": plan.model_identity,
        "input": {"uri": plan.inputs.uri, "rows": plan.inputs.num_rows,
                  "files": [{"path": with_scheme(plan.inputs.uri, f.path), "rows": f.num_rows, "bytes": f.size}
                            for f in plan.inputs.files]},
        "output": {"uri": plan.output.uri, "chunk_rows": plan.chunk_rows, **totals},
        # part -> the input rows it holds, as [file index, first row, stop row] ranges
        "parts": {c.id: [[p.file_index, p.start, p.stop] for p in c.pieces] for c in plan.chunks},
        "duplicate_id_rows": plan.num_duplicate_rows,
        "config": dataclasses.asdict(plan.job),
        "versions": {"lmbatch": lmbatch.__version__, "ray": ray.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "pyarrow": pa.__version__},
    }
