"""Hive-style partitioned parts (output.partition_by): every row lands in one partition, null and NaN too.
"""


import pyarrow as pa
import pyarrow.parquet as pq

from lmbatch.output.directory import OutputDir, OutputState


def test_every_row_lands_in_one_partition_null_and_nan_too(tmp_path):
    """A float column holds NaN, which equals nothing, itself included: its rows must not vanish."""
    out = OutputDir(str(tmp_path / "out"), "score")
    out.begin(OutputState(), "0123456789abcdef", 4)
    out.write_part("00000-000000000", pa.table({"id": [1, 2, 3, 4], "score": [1.0, float("nan"), None, 1.0]}))
    parts = {p.parent.name: pq.read_table(p)["id"].to_pylist() for p in (tmp_path / "out").glob("score=*/*.parquet")}
    assert parts == {"score=1.0": [1, 4], "score=nan": [2], "score=__HIVE_DEFAULT_PARTITION__": [3]}
