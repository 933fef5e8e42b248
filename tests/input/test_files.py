"""Input discovery and validation: filesystems, globs, table layouts (Hive, Spark, pandas), repeated ids."""

from collections import Counter

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers.data import write_prompts
from lmbatch.errors import JobError
from lmbatch.input.chunks import plan_chunks, read_chunk
from lmbatch.input.files import inspect_inputs
from lmbatch.input.scans import find_duplicate_ids


def test_a_filesystem_only_fsspec_knows_is_read_through_pyarrow():
    """memory:// has no pyarrow filesystem; fsspec's is wrapped (the same path serves az://, etc.)."""
    memory = fsspec.filesystem("memory")
    table = pa.table({"id": list(range(10)), "prompt": [f"prompt {i}" for i in range(10)], "x": [1.0] * 10})
    for name, rows in (("a", slice(0, 6)), ("b", slice(6, 10))):
        with memory.open(f"/lmbatch-io-test/in/{name}.parquet", "wb") as f:
            pq.write_table(table[rows], f, row_group_size=3)  # chunks cut across row groups
    plan = inspect_inputs("memory://lmbatch-io-test/in", {"prompt": "string", "id": "any"})
    assert [f.num_rows for f in plan.files] == [6, 4]
    chunks = plan_chunks(plan.files, 4)
    assert [[(p.file_index, p.start, p.stop) for p in c.pieces] for c in chunks] == [
        [(0, 0, 4)], [(0, 4, 6), (1, 0, 2)], [(1, 2, 4)]]
    got = pa.concat_tables(read_chunk(plan.uri, c, ["id", "prompt"]) for c in chunks)
    assert got.equals(table.select(["id", "prompt"]))


def test_hive_partition_directories_become_string_columns(tmp_path):
    """A table Spark wrote partitioned by country and day keeps both columns, read from the paths."""
    layout = {("FR", "2024-01-01"): [1, 2], ("DE", "2024-01-01"): [3], ("a/b c", "2024-01-02"): [4],
              (None, "2024-01-02"): [5, 1]}
    for (country, day), ids in layout.items():
        folder = "__HIVE_DEFAULT_PARTITION__" if country is None else country.replace("/", "%2F").replace(" ", "%20")
        path = tmp_path / "in" / f"country={folder}" / f"day={day}" / "part-0.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "prompt": [f"p{i}" for i in ids]}), path)
    (tmp_path / "in" / "_SUCCESS").touch()
    for leftover in ("_temporary/0/country=FR/day=2024-01-01", ".staging/country=FR/day=2024-01-01"):
        (tmp_path / "in" / leftover).mkdir(parents=True)  # an unfinished Spark write: not rows of the table
        pq.write_table(pa.table({"id": [99], "prompt": ["partial"]}), tmp_path / "in" / leftover / "part-9.parquet")
    plan = inspect_inputs(str(tmp_path / "in"), {"prompt": "string", "id": "any", "country": "any"})
    assert plan.schema.names == ["id", "prompt", "country", "day"] and plan.schema.field("day").type == pa.string()
    assert plan.partition_columns == ("country", "day") and plan.num_rows == 6
    got = pa.concat_tables(read_chunk(plan.uri, c, ["country", "id", "day"]) for c in plan_chunks(plan.files, 2))
    assert got.column_names == ["country", "id", "day"]
    assert Counter(tuple(r.values()) for r in got.to_pylist()) == Counter(
        (country, i, day) for (country, day), ids in layout.items() for i in ids)
    assert len(find_duplicate_ids(plan.uri, plan.files, "id")) == 1  # id 1 repeats across partitions
    # A glob's partitions count from the directory the pattern starts below.
    glob = inspect_inputs(str(tmp_path / "in" / "country=*" / "*" / "*.parquet"), {"prompt": "string"})
    assert glob.schema.names == ["id", "prompt", "country", "day"]

    pq.write_table(pa.table({"id": [9], "prompt": ["stray"]}), tmp_path / "in" / "stray.parquet")
    with pytest.raises(JobError, match="Hive partition directories"):
        inspect_inputs(str(tmp_path / "in"), {"prompt": "string"})


@pytest.mark.parametrize("prompts", [
    pa.array(["a", "b"], pa.large_string()),
    pa.array(["a", "b"]).dictionary_encode(),  # what pandas writes for a `category` column
    pa.array(["a", "b"], pa.string_view()),
])
def test_prompts_may_be_any_arrow_text_type(tmp_path, prompts):
    pq.write_table(pa.table({"id": [1, 2], "prompt": prompts}), tmp_path / "in.parquet")
    plan = inspect_inputs(str(tmp_path / "in.parquet"), {"prompt": "string", "id": "any"})
    assert read_chunk(plan.uri, plan_chunks(plan.files, 2)[0], ["prompt"])["prompt"].to_pylist() == ["a", "b"]


def test_many_files_are_read_concurrently_and_reported_in_input_order(tmp_path):
    """Footers and id columns are read 16 files at a time; results, duplicates and the first bad
    file must still come in input order."""
    for i in range(40):
        pq.write_table(pa.table({"id": [i, 100 + i % 3], "prompt": ["a", "b"]}), tmp_path / f"f{i:02d}.parquet")
    plan = inspect_inputs(str(tmp_path), {"prompt": "string", "id": "any"})
    assert [f.path.rsplit("/", 1)[1] for f in plan.files] == [f"f{i:02d}.parquet" for i in range(40)]
    # ids 100..102 first appear in files 0..2 (rows 1, 3, 5); every later occurrence is a repeat
    assert find_duplicate_ids(plan.uri, plan.files, "id") == [2 * i + 1 for i in range(3, 40)]
    for i in (30, 7):
        (tmp_path / f"f{i:02d}.parquet").write_bytes(b"not parquet")
    with pytest.raises(JobError, match="f07.parquet is not a readable Parquet file"):
        inspect_inputs(str(tmp_path), {"prompt": "string"})


@pytest.mark.parametrize("ids,repeats", [
    (pa.array([-1, -2, 1, 2**61, None, -1]), [5]),  # hash(-1) == hash(-2), hash(1) == hash(2**61)
    (pa.array([2**64 - 1, 2**63, 2**64 - 1], pa.uint64()), [2]),
    (pa.array([-1.0, -2.0, 0.5, 0.5]), [3]),
    (pa.array([{"a": 1}, {"a": 2}, {"a": 1}]), [2]),  # not hashable as Python values
    (pa.array(["x", "y", None, "x"]).dictionary_encode(), [3]),
])
def test_only_equal_ids_count_as_repeats(tmp_path, ids, repeats):
    pq.write_table(pa.table({"id": ids, "prompt": ["a"] * len(ids)}), tmp_path / "in.parquet", row_group_size=2)
    plan = inspect_inputs(str(tmp_path / "in.parquet"), {"prompt": "string", "id": "any"})
    assert find_duplicate_ids(plan.uri, plan.files, "id") == repeats


def test_a_glob_matches_as_a_shell_would(tmp_path):
    """`*` stays within a directory (fnmatch's crossed into subdirectories: `in/*.parquet` took an
    `in/archive/` of old files too), `**` crosses any number, and names starting with `_` or `.`
    (an unfinished Spark write) are left out unless the pattern names them so."""
    for name in ("a.parquet", "archive/b.parquet", "archive/2024/c.parquet", "_temporary/0/d.parquet", ".e.parquet"):
        write_prompts(tmp_path / "in" / name, [name])

    def found(pattern):
        return sorted(pq.read_table(f.path)["prompt"][0].as_py()
                      for f in inspect_inputs(str(tmp_path / "in" / pattern), {"prompt": "string"}).files)

    assert found("*.parquet") == ["a.parquet"]
    assert found("*/*.parquet") == ["archive/b.parquet"]
    assert found("**/*.parquet") == ["a.parquet", "archive/2024/c.parquet", "archive/b.parquet"]
    assert found("_temporary/*/*.parquet") == ["_temporary/0/d.parquet"]
    assert found(".*.parquet") == [".e.parquet"]


def test_a_column_all_null_in_one_file_takes_the_type_of_the_others(tmp_path):
    """pandas writes a column of Nones as type `null`: such files join the others, and every part
    gets the same types (a chunk of only that file too). Column order may differ between files."""
    for name, notes in (("a", pa.array(["x", "y"])), ("b", pa.nulls(2)), ("c", pa.array([None, "z"]))):
        prompts = pa.nulls(2) if name == "b" else pa.array(["p", "q"])
        columns = {"id": [1, 2], "prompt": prompts, "note": notes}
        if name == "c":
            columns = dict(reversed(columns.items()))
        pq.write_table(pa.table(columns), tmp_path / f"{name}.parquet")
    plan = inspect_inputs(str(tmp_path), {"prompt": "string", "id": "any"})
    assert plan.schema.field("note").type == plan.schema.field("prompt").type == pa.string()
    chunks = plan_chunks(plan.files, 2)  # one chunk per file
    read = [read_chunk(plan.uri, c, ["id", "prompt", "note"], plan.schema) for c in chunks]
    assert {t.schema for t in read} == {pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("note", pa.string())])}
    assert [t["note"].to_pylist() for t in read] == [["x", "y"], [None, None], [None, "z"]]
    pq.write_table(pa.table({"id": [3], "prompt": ["r"], "note": [1.5]}), tmp_path / "d.parquet")
    with pytest.raises(JobError, match=f"^input file {tmp_path / 'd.parquet'} does not match the files before it: "
                                       "its column 'note' is double, theirs string$"):  # a real clash stops the job
        inspect_inputs(str(tmp_path), {"prompt": "string"})


def test_files_from_different_writers_join_under_types_that_hold_every_value(tmp_path):
    """The same table written over time by different tools: polars writes large_string where
    pyarrow and pandas write string, a pandas category is a dictionary, Spark's IntegerType is int32."""
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "prompt": ["p", "q"], "topic": ["a", "b"]}),
                   tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([3], pa.int32()), "prompt": pa.array(["r"], pa.large_string()),
                             "topic": pa.array(["a"]).dictionary_encode()}), tmp_path / "b.parquet")
    plan = inspect_inputs(str(tmp_path), {"prompt": "string", "id": "any"})
    merged = pa.schema([("id", pa.int64()), ("prompt", pa.large_string()), ("topic", pa.string())])
    assert plan.schema == merged
    read = [read_chunk(plan.uri, c, merged.names, plan.schema) for c in plan_chunks(plan.files, 2)]
    assert {t.schema for t in read} == {merged}
    assert pa.concat_tables(read).to_pylist() == [{"id": 1, "prompt": "p", "topic": "a"},
                                                  {"id": 2, "prompt": "q", "topic": "b"},
                                                  {"id": 3, "prompt": "r", "topic": "a"}]
    # what no one type holds without loss, or a column one file lacks, is named
    pq.write_table(pa.table({"id": pa.array([4], pa.uint64()), "prompt": ["s"]}), tmp_path / "c.parquet")
    with pytest.raises(JobError, match="c.parquet does not match the files before it: it lacks column\\(s\\) 'topic'; "
                                      "its column 'id' is uint64, theirs int64$"):
        inspect_inputs(str(tmp_path), {"prompt": "string", "id": "any"})


def test_a_file_with_two_columns_of_one_name_is_named(tmp_path):
    """pyarrow writes such a file; reading any of its columns by name then fails with a KeyError."""
    pq.write_table(pa.table({"id": [1], "prompt": ["p"]}), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array([2]), pa.array(["q"]), pa.array(["r"])], ["id", "prompt", "prompt"]),
                   tmp_path / "b.parquet")
    with pytest.raises(JobError, match=f"^input file {tmp_path / 'b.parquet'} has more than one column named 'prompt'"):
        inspect_inputs(str(tmp_path), {"prompt": "string", "id": "any"})


def test_an_unknown_scheme_is_a_job_error():
    with pytest.raises(JobError, match="neither pyarrow nor fsspec"):
        inspect_inputs("nosuchscheme://bucket/in", {"prompt": "string"})


