"""Side-by-side throughput benchmark: the lmbatch engine against what users would use instead.

All variants run on the same deterministic prompts, interleaved (A B C ... A B C ...) so that
drift on the machine hits all alike, and are reported as ratios to the naive baseline:

    bucketed     lmbatch engine, length-bucketed micro-batches, in-process
    unshared     the same, without computing a prefix its prompts share once (batching.share_prefix=false):
                 for templated workloads (shared_prefix_tokens, templates); not run unless asked for
    ungrouped    the same, sharing prefixes but ordering rows by length alone (batching.group_prefixes=false):
                 for workloads of several templates; not run unless asked for
    fixed        the same engine, input order, fixed batch size (the baseline)
    pipeline     transformers pipeline("text-generation", batch_size=B)
    continuous   transformers continuous batching (per-row max_new_tokens, explicitly sized cache)
    ray_job      the whole lmbatch job end to end (Parquet in, Ray Data, Parquet out)
    vllm         plain vLLM offline, `LLM.generate` on the token ids in-process: what a user writes
                 instead (the vllm extra; not run unless asked for, as the two below)
    vllm_engine  engine=vllm as a replica runs it, in-process, on the same vLLM engine as `vllm`
    vllm_job     the whole job with engine=vllm on `vllm_replicas` replicas
    sentence_transformers
                 with `embed` only: sentence-transformers' encode() (its default batch size, 32; it
                 sorts each call's texts by length), what a user embeds with instead

Greedy outputs of every variant but the pipeline are compared row for row with bucketed's (the
count of differing rows is reported; see `compare`). The pipeline cannot take a max_new_tokens
per row, so it generates the longest for every row; it is timed, not compared.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
from hydra.core.config_store import ConfigStore

from lmbatch.bench.runners import Bench, Result
from lmbatch.bench.workload import build_model
from lmbatch.config import EMBEDDING_POOLINGS, BatchingConfig, VLLMConfig
from lmbatch.plan.engine_checks import INSTALL

VARIANTS = ("bucketed", "fixed", "pipeline", "continuous", "ray_job", "unshared", "ungrouped", "sentence_transformers",
            "vllm", "vllm_engine", "vllm_job")
VLLM_VARIANTS = {"vllm", "vllm_engine", "vllm_job"}
GENERATING = {"pipeline", "continuous", "ray_job", *VLLM_VARIANTS}
"""The variants that only generate; `sentence_transformers` only embeds."""


@dataclass
class BenchmarkConfig:
    model_shape: str = "tiny"
    """Model shape, random weights from a config: tiny, small, gpt2_small, qwen2_5_0_5b; or an encoder, which
    only embeds: tiny_bert, bert_small (all-MiniLM-L6-v2's shape). (`model=` would clash with the job's model
    config group.)"""
    num_prompts: int = 64
    """Prompts in the workload."""
    min_prompt_tokens: int = 4
    max_prompt_tokens: int = 1024
    """Prompt lengths are log-normal (heavy-tailed like real traffic), clipped to [min, max]."""
    median_prompt_tokens: int = 48
    """Median of the log-normal prompt length."""
    min_new_tokens: int = 4
    max_new_tokens: int = 64
    """Per-row max_new_tokens are drawn uniformly from [min, max]: real batch requests differ."""
    shared_prefix_tokens: int = 0
    """Tokens of instructions every prompt begins with, before its own text (one template's prompts); the
    prompt lengths above are then those of the texts after them. 0: none."""
    templates: int = 1
    """Distinct instructions of shared_prefix_tokens each (a job mixing templates): rows take them in turn."""
    embed: Optional[str] = None
    """`last`, `mean` or `cls`: the engine's variants (and sentence_transformers) embed the prompts instead
    (generation.embedding, with max_new_tokens 0), and rows differ when their vectors do by more than 1e-4;
    null: generate."""
    seed: int = 0
    """Seed of the synthetic workload and the model's random weights."""
    repeats: int = 1
    """Interleaved rounds over the variants; each variant reports its best round."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS[:5]))
    """Which variants to run (the first of bucketed/fixed present is the ratio baseline: fixed if present)."""
    dtype: str = "auto"
    """float32 on CPU, bfloat16 on GPU with auto."""
    device: str = "auto"
    """cpu, cuda or auto."""
    threads: Optional[int] = None
    """Torch threads for in-process variants; null = all cores."""
    kv_cache: Optional[str] = None
    """The engine's KV cache (as model.kv_cache): static, dynamic; null: static on GPU, dynamic on CPU."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """The engine's planner, a conf/batching option as in the job (the `fixed` variant swaps in
    strategy=fixed; its fixed_batch_size is also the transformers pipeline's batch size).
    chunk_rows is the Ray job's window only: in process the engine plans all prompts at once."""
    cb_page_size: int = 64
    cb_num_blocks: int = 512
    cb_max_batch_tokens: int = 2048
    """Continuous batching cache: num_blocks x page_size tokens of KV cache, sized explicitly."""
    ray_replicas: int = 2
    ray_cpus_per_replica: float = 0.5
    """The end-to-end job's replica pool."""
    vllm_replicas: int = 1
    """vllm_job's replicas: on a CPU one vLLM engine takes every core (two on 2 cores contend)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine of the vllm variants, as the job's `vllm` group."""
    memory_bandwidth_gb_s: Optional[float] = None
    """Accelerator memory bandwidth (H200: 4800); when set, decode throughput is compared with its limit."""
    time_limit_s: Optional[float] = None
    """Stop the in-process engine (bucketed, fixed) after the micro-batch that crosses this many
    seconds, and report how far it got and the time the whole run would take at that pace; null:
    no limit. A run that must finish in a set time then reports in that time, not never."""
    log_micro_batches: bool = False
    """Log every micro-batch of the in-process engine (rows, prompt length, steps, seconds) as it ends."""
    output_dir: str = "${hydra:runtime.output_dir}"
    """Where results.json and results.md go."""


def register_config() -> None:
    """Register the schema so `defaults: [benchmark_schema, ...]` type-checks every key."""
    ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


def _faster(a: Result, b: Result) -> bool:
    """The better of two rounds: more rows done (a time limit may stop one), then less time."""
    def key(r: Result):
        return (float("inf") if r.rows_done is None else r.rows_done), -r.seconds
    return key(a) > key(b)


def compare(results: dict[str, Result]) -> dict[str, int]:
    """Rows whose greedy text differs from the bucketed engine's, per variant (0: identical); an
    embedding differs by more than 1e-4 (padding changes a float's rounding, never so much).

    With float32 a handful of texts can differ on random-weight models where the top two logits tie
    to within ~1e-5: padding changes the rounding, and such a row goes either way.
    """
    def differ(a, b) -> bool:
        return a != b if isinstance(a, str) else not np.allclose(a, b, rtol=0, atol=1e-4)
    reference = results.get("bucketed") or next(iter(results.values()))
    return {name: sum(differ(a, b) for a, b in zip(r.texts, reference.texts) if a is not None and b is not None)
            for name, r in results.items()}


def markdown(rows: list[dict], baseline: str, header: str) -> str:
    columns = ["variant", "seconds", "rows_per_s", "generated_tokens_per_s", "prompt_tokens_per_s",
               "padding_efficiency", "decode_slot_efficiency", "peak_rss_mb", f"x_{baseline}", "rows_differing"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in columns) + " |")
    return "\n".join(lines) + "\n"


def bandwidth_note(result: Result, model, bandwidth_gb_s: float) -> str:
    """Decode is memory-bound: every step reads all weights once, for all rows of the step.

    limit tokens/s = bandwidth / weight bytes x average rows per step (KV-cache reads ignored,
    so the limit is optimistic and the ratio conservative).
    """
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows_per_step = result.decode_slots / result.decode_steps
    limit = bandwidth_gb_s * 1e9 / weight_bytes * rows_per_step
    measured = result.generated_tokens / result.seconds
    return (f"Memory-bandwidth limit for decode = bandwidth / weight bytes x rows per step = "
            f"{bandwidth_gb_s:,.0f} GB/s / {weight_bytes / 1e9:.3f} GB x {rows_per_step:.1f} = {limit:,.0f} tokens/s; "
            f"measured {measured:,.0f} generated tokens/s (prefill included) = {measured / limit:.3g} of the limit.")


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """Run every variant of the workload, interleaved, keep each one's best round, and report them side by
    side as ratios (results.md and results.json in cfg.output_dir)."""
    check_variants(cfg)
    if cfg.log_micro_batches:
        logging.getLogger("lmbatch.engine").setLevel(logging.DEBUG)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The model, the prompts as Parquet and the Ray job's output: a GB or more for the GPU preset.
    with tempfile.TemporaryDirectory(prefix="lmbatch-bench-") as workdir:
        bench = Bench(cfg, build_model(cfg.model_shape, Path(workdir) / "model", cfg.seed), Path(workdir))
        best: dict[str, Result] = {}
        for round_ in range(cfg.repeats):  # interleaved: every variant once per round
            for variant in cfg.variants:
                result = bench.run(variant)
                print(f"[benchmark] round {round_ + 1}: {variant:<10} {result.seconds:8.2f}s "
                      f"{result.generated_tokens / result.seconds:10.1f} gen tok/s", flush=True)
                if variant not in best or _faster(result, best[variant]):
                    best[variant] = result
        bench.close()
    report = make_report(cfg, bench, best)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(report["results"], report["baseline"], report["header"]) + "".join(
        f"\n{n}\n" for n in report["notes"])
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"benchmark results in {out_dir}")
    return report


def check_variants(cfg: BenchmarkConfig) -> None:
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if set(cfg.variants) & VLLM_VARIANTS and importlib.util.find_spec("vllm") is None:
        raise ValueError(f"the variants {sorted(set(cfg.variants) & VLLM_VARIANTS)} need vLLM, not installed here: "
                         f"{INSTALL}")
    if cfg.embed not in (None, *EMBEDDING_POOLINGS):
        raise ValueError(f"embed must be {', '.join(EMBEDDING_POOLINGS)} or null, got {cfg.embed!r}")
    if cfg.embed and set(cfg.variants) & GENERATING:
        raise ValueError("embed compares the engine's variants (bucketed, fixed, unshared, ungrouped) and "
                         "sentence_transformers alone")
    if not cfg.embed and "sentence_transformers" in cfg.variants:
        raise ValueError("the sentence_transformers variant embeds: set embed")
    if cfg.embed and cfg.time_limit_s:  # its projection goes by decode steps, of which embedding has none
        raise ValueError("embed runs without time_limit_s")


def make_report(cfg: BenchmarkConfig, bench: Bench, best: dict[str, Result]) -> dict:
    """The variants' best rounds as rows with their ratio to the baseline, the notes on them, and the
    workload and machine they ran on."""
    rows_n = len(bench.texts)
    baseline = "fixed" if "fixed" in best else cfg.variants[0]
    same = compare({k: v for k, v in best.items() if k != "pipeline"})
    rows = []
    for variant in cfg.variants:
        row = best[variant].row(rows_n)
        row[f"x_{baseline}"] = round(best[baseline].whole_seconds / best[variant].whole_seconds, 3)
        row["rows_differing"] = same.get(variant)
        rows.append(row)
    machine = (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, device {bench.device}, "
               f"{bench.dtype}")
    header = (f"Benchmark: model shape `{cfg.model_shape}`, {rows_n} prompts ({sum(map(len, bench.ids)):,} prompt tokens, "
              f"{cfg.min_prompt_tokens}-{cfg.max_prompt_tokens} log-normal), "
              + (f"embedded ({cfg.embed} pooling), nothing generated" if cfg.embed else
                 f"max_new_tokens {cfg.min_new_tokens}-{cfg.max_new_tokens} per row")
              + f"; {machine}; best of {cfg.repeats} interleaved rounds.")
    return {"config": dataclasses.asdict(cfg), "machine": machine, "header": header, "baseline": baseline,
            "results": rows, "greedy_rows_differing_from_bucketed": same, "notes": notes(cfg, bench, best)}


def notes(cfg: BenchmarkConfig, bench: Bench, best: dict[str, Result]) -> list[str]:
    """What the table alone does not say: variants stopped by the time limit, the Ray job's start-up, and
    how near the memory bandwidth the engine decodes."""
    rows_n = len(bench.texts)
    found = [f"{name} was stopped by time_limit_s={cfg.time_limit_s:g}: {r.rows_done:,} of {rows_n:,} rows in "
             f"{r.seconds:.1f}s; at that pace (by planned decode steps) the whole run would take about "
             f"{r.projected_seconds:,.1f}s." for name, r in best.items() if r.rows_done is not None]
    if "ray_job" in best and "bucketed" in best and best["ray_job"].startup_seconds is not None:
        ray = best["ray_job"]
        steady = best["bucketed"].seconds / max(ray.seconds - ray.startup_seconds, 1e-9)
        found.append(f"Ray Data job vs in-process bucketed engine: {best['bucketed'].seconds / ray.seconds:.3f}x "
                     f"end to end, {steady:.3f}x with its start-up ({ray.startup_seconds:.1f}s: Ray, replicas, "
                     "model loads) excluded.")
    if "vllm_job" in best and "vllm" in best and best["vllm_job"].startup_seconds is not None:
        job, plain = best["vllm_job"], best["vllm"]
        steady = plain.seconds / max(job.seconds - job.startup_seconds, 1e-9)
        found.append(f"engine=vllm job vs plain vLLM: {plain.seconds / job.seconds:.3f}x end to end, {steady:.3f}x "
                     f"with its start-up ({job.startup_seconds:.1f}s: Ray, replicas, vLLM start and warm-up) excluded; "
                     f"plain vLLM's own start-up and warm-up took {plain.startup_seconds:.1f}s.")
    if cfg.memory_bandwidth_gb_s and "bucketed" in best and best["bucketed"].decode_steps:
        found.append(bandwidth_note(best["bucketed"], bench.model, cfg.memory_bandwidth_gb_s))
    return found
