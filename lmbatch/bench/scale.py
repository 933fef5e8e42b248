"""Scale benchmark: what the pipeline costs and how its memory grows with rows.

For each size it writes a synthetic input (rows spread over many files), then runs
    job        the whole lmbatch job (engine=echo by default: no model, so only the pipeline is measured)
    ray_data   Ray Data alone reading and writing the same Parquet: the floor for any Ray Data job
each as a subprocess sampled for peak RSS of the driver and of the largest worker; reports the
job's object-store peak (from its _metrics.json), rows/s and output file count; and checks every
row came out exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from hydra.core.config_store import ConfigStore

from lmbatch.report.samplers import PeakSampler
from lmbatch.report.summary import megabytes

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ScaleConfig:
    sizes: list[int] = field(default_factory=lambda: [10_000, 100_000, 1_000_000])
    """Row counts to run, smallest first."""
    rows_per_file: int = 1000
    """Input rows per file: 1M rows -> 1,000 files."""
    row_group_rows: Optional[int] = None
    """Rows per Parquet row group (null: one per file)."""
    engine: str = "echo"
    """echo (pipeline alone) or hf (the built-in tiny model)."""
    max_new_tokens: int = 2
    """Tokens per row with engine=hf."""
    chunk_rows: int = 4096
    """Rows per chunk (one task, one generate window and one output part each)."""
    num_replicas: int = 2
    compare_ray_data: bool = True
    """Also time Ray Data alone reading and writing the same Parquet."""
    work_dir: str = "${hydra:runtime.output_dir}"
    """Where inputs, outputs and results.json / results.md go."""


def register_config() -> None:
    """Register the schema so `defaults: [scale_schema, ...]` type-checks every key."""
    ConfigStore.instance().store(name="scale_schema", node=ScaleConfig)


def write_input(directory: Path, rows: int, rows_per_file: int, row_group_rows: Optional[int]) -> Path:
    """Deterministic prompts of varied length, `rows_per_file` rows in each file."""
    from lmbatch.input.builtin import sample_sentences

    pool = pa.array(sample_sentences(4096, seed=99))
    directory.mkdir(parents=True, exist_ok=True)
    for start in range(0, rows, rows_per_file):
        ids = pa.array(range(start, min(start + rows_per_file, rows)), pa.int64())
        prompts = pool.take(pc.remainder(ids, len(pool)))
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), directory / f"prompts-{start:09d}.parquet",
                       row_group_size=row_group_rows)
    return directory


def driver_and_largest_worker_rss(process: psutil.Process) -> tuple[int, int]:
    """RSS of a process and of its largest child (Ray's own daemons left out)."""
    largest = 0
    for child in process.children(recursive=True):
        try:
            name = " ".join(child.cmdline()[:3])
            if "raylet" not in name and "gcs_server" not in name:
                largest = max(largest, child.memory_info().rss)
        except psutil.Error:  # ended meanwhile
            pass
    return process.memory_info().rss, largest


def run_measured(command: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    process = psutil.Process(proc.pid)
    with PeakSampler(lambda: driver_and_largest_worker_rss(process), interval=1.0) as rss:
        output, _ = proc.communicate()
    driver, worker = rss.peak or (0, 0)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - start, "driver_peak_rss_mb": megabytes(driver),
            "largest_worker_peak_rss_mb": megabytes(worker), "log": output}


RAY_DATA_ALONE = """
import sys, ray
ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
ray.data.read_parquet(sys.argv[1]).write_parquet(sys.argv[2])
"""


def check_exactly_once(out: Path, rows: int) -> None:
    ids = pq.read_table(out, columns=["id"])["id"]
    if len(ids) != rows or pc.count_distinct(ids).as_py() != rows:
        raise AssertionError(f"{out}: {len(ids)} rows, {pc.count_distinct(ids).as_py()} distinct ids, expected {rows}")


def run_scale(cfg: ScaleConfig) -> dict:
    work = Path(cfg.work_dir)
    results = []
    for rows in cfg.sizes:
        source = write_input(work / f"in-{rows}", rows, cfg.rows_per_file, cfg.row_group_rows)
        out = work / f"out-{rows}"
        job = run_measured([sys.executable, str(REPO / "jobs" / "generate.py"), f"input.path={source}",
                            f"output.path={out}", f"engine={cfg.engine}", f"batching.chunk_rows={cfg.chunk_rows}",
                            f"generation.max_new_tokens={cfg.max_new_tokens}", f"cluster.num_replicas={cfg.num_replicas}",
                            f"hydra.run.dir={work / f'run-{rows}'}"], work)
        check_exactly_once(out, rows)
        metrics = json.loads((out / "_metrics.json").read_text())
        row = {"rows": rows, "files": -(-rows // cfg.rows_per_file),
               "job_rows_per_s": round(rows / job["seconds"], 1),
               "job_seconds": round(job["seconds"], 1), "startup_seconds": metrics.get("startup_seconds"),
               "output_files": len([p for p in os.listdir(out) if p.endswith(".parquet")]),
               "object_store_peak_mb": metrics.get("object_store_peak_mb"),
               **{k: v for k, v in job.items() if k not in ("seconds", "log")}}
        if cfg.compare_ray_data:
            alone = run_measured([sys.executable, "-c", RAY_DATA_ALONE, str(source), str(work / f"ray-out-{rows}")], work)
            row["ray_data_rows_per_s"] = round(rows / alone["seconds"], 1)
            row["job_vs_ray_data"] = round(alone["seconds"] / job["seconds"], 3)
        print(f"[scale] {row}", flush=True)
        results.append(row)
    base = results[0]["driver_peak_rss_mb"]
    for r in results:
        r["driver_rss_vs_smallest"] = round(r["driver_peak_rss_mb"] / base, 3)
    report = {"config": dataclasses.asdict(cfg), "machine": f"{os.cpu_count()} CPU cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM", "results": results}
    (work / "results.json").write_text(json.dumps(report, indent=2))
    columns = list(results[0])
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                      + ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in results])
    (work / "results.md").write_text(f"Scale benchmark, engine={cfg.engine}, {report['machine']}\n\n{table}\n")
    print(table)
    return report
