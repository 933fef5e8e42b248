"""The `output` group: where the parts go, how a run treats what is there, and the output's options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from lmbatch.config.checks import require

PARQUET_CODECS = ("snappy", "zstd", "gzip", "lz4", "brotli", "none")


@dataclass
class OutputConfig:
    path: str = "${hydra:runtime.output_dir}/output"
    """Directory (or URI) that receives the Parquet parts, `_manifest.json`, `_metrics.json`, `_SUCCESS`."""
    mode: str = "resume"
    """`resume`: continue this job's partial output (a finished one is a no-op); `overwrite`: start afresh;
    `retry_errors`: resume, and generate again the chunks holding rows that failed in generation (out of
    memory, a crash, the model raising), not for their input, as a larger GPU or a fix may make them pass."""
    max_rows_per_file: Optional[int] = None
    """Cap on rows per output part (each chunk is one part, so this caps batching.chunk_rows too)."""
    partition_by: Optional[str] = None
    """Input column to partition the output by, Hive style: `COLUMN=value/part-*.parquet`."""
    compression: str = "snappy"
    """Parquet codec of the parts: `snappy` (read everywhere), `zstd` (smaller), `gzip`, `lz4`, `brotli`, `none`."""
    reasoning_tags: list[str] = field(default_factory=list)
    """The tags around a reasoning model's thinking, e.g. `["<think>", "</think>"]` (Qwen3, DeepSeek-R1,
    QwQ): the text before the closing tag goes to a `reasoning` column and `generated_text` holds the
    answer after it. []: the text as generated."""
    max_error_fraction: Optional[float] = None
    """The share of error rows a job may have: more, and it stops once 1,000 rows are done in a run (a
    template naming the wrong column, a model failing every row), or, for a smaller job, ends without
    `_SUCCESS`, exit status 1 either way. 0: any error row fails the job; null: never (the default)."""
    parse_json: bool = False
    """Add a `generated_json` column: each text parsed as JSON, typed by generation.json_schema (an object
    a struct of its properties, an array a list, ...), so the answers' fields are columns to query; null
    for a text that is not a value the schema accepts whole (one cut at the token limit)."""

    def __post_init__(self) -> None:
        require(bool(self.path), "output.path must be set")
        require(not self.reasoning_tags or (len(self.reasoning_tags) == 2 and all(self.reasoning_tags)),
                 f"output.reasoning_tags must be [] or an opening and a closing tag, got {self.reasoning_tags}")
        require(self.max_error_fraction is None or 0 <= self.max_error_fraction <= 1,
                 f"output.max_error_fraction must be between 0 and 1 or null, got {self.max_error_fraction}")
        require(self.compression in PARQUET_CODECS,
                 f"output.compression must be one of {', '.join(PARQUET_CODECS)}, got {self.compression!r}")
        require(self.max_rows_per_file is None or self.max_rows_per_file >= 1,
                 f"output.max_rows_per_file must be >= 1 or null, got {self.max_rows_per_file}")
        require(self.mode in ("resume", "overwrite", "retry_errors"),
                 f"output.mode must be 'resume', 'overwrite' or 'retry_errors', got {self.mode!r}")

    def too_many_errors(self, rows: int, errors: int) -> bool:
        return self.max_error_fraction is not None and errors > self.max_error_fraction * rows
