"""Prompts and the Parquet files that hold them."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def varied_prompts(n: int, seed: int = 0, max_words: int = 300) -> list[str]:
    """Prompts from one word to several hundred tokens, in shuffled order."""
    from lmbatch.input.builtin import WORDS

    rng = random.Random(seed)
    lengths = [1, 2, 3, max_words] + [int(rng.lognormvariate(2.5, 1.2)) + 1 for _ in range(n - 4)]
    rng.shuffle(lengths)
    return [" ".join(rng.choice(WORDS) for _ in range(min(k, max_words))) for k in lengths]


def write_prompts(path: Path, prompts: list, ids: list | None = None, **extra_columns) -> Path:
    ids = list(range(len(prompts))) if ids is None else ids
    table = pa.table({"id": ids, "prompt": pa.array(prompts, pa.string()), **extra_columns})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def corrupt_column(path, row_group: int, column: int):
    """Overwrite one column's pages in one row group: the footer (read when planning) stays intact,
    as when a disk or a copy garbled the data."""
    meta = pq.ParquetFile(path).metadata.row_group(row_group).column(column)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    data = bytearray(path.read_bytes())
    data[start:start + meta.total_compressed_size] = b"Z" * meta.total_compressed_size
    path.write_bytes(bytes(data))
    return path


def rows_in_row_groups(path, rows: int, row_group_rows: int):
    pq.write_table(pa.table({"id": range(rows), "prompt": [f"row {i} says hi" for i in range(rows)]}), path,
                   row_group_size=row_group_rows)
    return path


def one_prompt(d):
    return write_prompts(d / "in.parquet", ["a"])


def snapshot(directory):
    return {p: (os.stat(os.path.join(directory, p)).st_mtime_ns, os.path.getsize(os.path.join(directory, p)))
            for p in os.listdir(directory)}
