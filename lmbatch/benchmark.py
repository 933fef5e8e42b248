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
    sentence_transformers
                 with `embed` only: sentence-transformers' encode() (its default batch size, 32; it
                 sorts each call's texts by length), what a user embeds with instead

Greedy outputs of fixed, continuous and ray_job are compared row for row with bucketed's (the
count of differing rows is reported; see `compare`). The pipeline cannot take a max_new_tokens
per row, so it generates the longest for every row; it is timed, not compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import psutil
from hydra.core.config_store import ConfigStore

from lmbatch.batching import decode_steps
from lmbatch.bench_workload import build_model, build_workload
from lmbatch.config import EMBEDDING_POOLINGS, BatchingConfig
from lmbatch.report import PeakSampler, megabytes

VARIANTS = ("bucketed", "fixed", "pipeline", "continuous", "ray_job", "unshared", "ungrouped", "sentence_transformers")
GENERATING = {"pipeline", "continuous", "ray_job"}
"""The variants that only generate; `sentence_transformers` only embeds."""
ST_POOLING = {"cls": "cls", "mean": "mean", "last": "lasttoken"}
"""generation.embedding's poolings by sentence-transformers' names."""


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


ConfigStore.instance().store(name="benchmark_schema", node=BenchmarkConfig)


# -- measuring -----------------------------------------------------------------------------------
def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and its children (Ray workers, Ray's daemons)."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # ended meanwhile
            pass
    return total


class TimeLimitReached(Exception):
    """Raised between micro-batches once `time_limit_s` has passed."""


@dataclass
class Result:
    variant: str
    seconds: float
    texts: list
    """Each row's text (its embedding with `embed`), None for a row not done."""
    generated_tokens: int
    prompt_tokens: int
    padded_prompt_tokens: int
    decode_slots: int
    decode_steps: int = 0
    peak_rss: int = 0
    startup_seconds: Optional[float] = None
    rows_done: Optional[int] = None
    """Rows completed, set only when the time limit stopped the run (texts of the rest are None)."""
    projected_seconds: Optional[float] = None
    """The whole run's time at the pace so far, by planned decode steps (when stopped)."""

    @property
    def whole_seconds(self) -> float:
        """The time for all rows: measured, or projected when a time limit stopped the run."""
        return self.projected_seconds or self.seconds

    def row(self, rows: int) -> dict:
        s = self.seconds
        rows = rows if self.rows_done is None else self.rows_done
        return {
            "variant": self.variant, "seconds": round(s, 3), "rows_per_s": round(rows / s, 3),
            "prompt_tokens_per_s": round(self.prompt_tokens / s, 1),
            "generated_tokens_per_s": round(self.generated_tokens / s, 1),
            "padding_efficiency": round(self.prompt_tokens / self.padded_prompt_tokens, 4) if self.padded_prompt_tokens else None,
            "decode_slot_efficiency": round(self.generated_tokens / self.decode_slots, 4) if self.decode_slots else None,
            "peak_rss_mb": megabytes(self.peak_rss),
            "startup_seconds": None if self.startup_seconds is None else round(self.startup_seconds, 2),
            "rows_done": rows,
            "projected_seconds": None if self.projected_seconds is None else round(self.projected_seconds, 3),
        }


class Bench:
    def __init__(self, cfg: BenchmarkConfig, model_path: str, workdir: Path):
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from lmbatch.models import reads_both_ways
        from lmbatch.tokens import load_tokenizer

        self.cfg, self.model_path, self.workdir = cfg, model_path, workdir
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if self.device == "cuda" else "float32")
        self.dtype = dtype
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.tokenizer = load_tokenizer(model_path)
        self.encoder = reads_both_ways(AutoConfig.from_pretrained(model_path))
        if self.encoder and not cfg.embed:
            raise ValueError(f"model_shape {cfg.model_shape} is an encoder, which only embeds: set embed (cls or mean)")
        auto = AutoModel if self.encoder else AutoModelForCausalLM
        self.model = auto.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.texts, self.ids, self.new = build_workload(cfg, self.tokenizer)
        if self.encoder and max(map(len, self.ids)) > self.tokenizer.model_max_length:
            raise ValueError(f"prompts of up to {max(map(len, self.ids))} tokens exceed the encoder's "
                             f"{self.tokenizer.model_max_length}: lower max_prompt_tokens")

    def run_engine(self, variant: str, **batching) -> Result:
        """The engine in-process, with the benchmark's batching changed by `batching` (one model serves all)."""
        from lmbatch.engine import HFEngine, Request
        from lmbatch.interface import Pooling, SamplingParams

        engine = HFEngine(self.model, self.tokenizer, dataclasses.replace(self.cfg.batching, **batching),
                          kv_cache=self.cfg.kv_cache)
        embed = self.cfg.embed
        params = SamplingParams(embedding=Pooling(embed)) if embed else SamplingParams()
        requests = [Request(i, ids, 0 if embed else m, params) for i, (ids, m) in enumerate(zip(self.ids, self.new))]
        limit = self.cfg.time_limit_s
        planned = [[r.key for r in b] for b in engine.plan(requests)] if limit else []  # keys are row indices
        texts: list = [None] * len(requests)  # texts, or embeddings
        batches_done = rows_done = 0

        def collect(completions):
            nonlocal batches_done, rows_done
            batches_done, rows_done = batches_done + 1, rows_done + len(completions)
            for c in completions:
                texts[c.key] = c.embedding.to_numpy() if embed else c.text
            if limit and time.perf_counter() - start > limit:
                raise TimeLimitReached

        start = time.perf_counter()
        try:
            engine.generate(requests, collect)
        except TimeLimitReached:
            pass
        seconds = time.perf_counter() - start
        s = engine.stats
        result = Result(variant, seconds, texts, s.generated_tokens, s.prompt_tokens,
                        s.padded_prompt_tokens, s.decode_slots, s.decode_steps)
        if batches_done < len(planned):
            result.rows_done = rows_done
            result.projected_seconds = (seconds * decode_steps(planned, self.new)
                                        / decode_steps(planned[:batches_done], self.new))
        return result

    def run_pipeline(self) -> Result:
        import torch
        from transformers import pipeline

        b = self.cfg.batching.fixed_batch_size
        pipe = pipeline("text-generation", model=self.model, tokenizer=self.tokenizer, batch_size=b,
                        device=torch.device(self.device))
        longest = max(self.new)
        start = time.perf_counter()
        with torch.inference_mode():
            outputs = pipe(self.texts, max_new_tokens=longest, do_sample=False, return_full_text=False,
                           pad_token_id=self.tokenizer.pad_token_id)
        seconds = time.perf_counter() - start
        texts, generated, slots = [], 0, 0
        for i, out in enumerate(outputs):
            tokens = self.tokenizer(out[0]["generated_text"], add_special_tokens=False)["input_ids"]
            texts.append(self.tokenizer.decode(tokens[: self.new[i]]))  # what this row asked for
            generated += min(len(tokens), self.new[i])
        for start_row in range(0, len(self.ids), b):  # input-order batches, each run to the longest budget
            batch = self.ids[start_row:start_row + b]
            slots += len(batch) * longest
        padded = sum(len(self.ids[i:i + b]) * max(map(len, self.ids[i:i + b])) for i in range(0, len(self.ids), b))
        return Result("pipeline", seconds, texts, generated, sum(map(len, self.ids)), padded, slots)

    def run_sentence_transformers(self) -> Result:
        import torch
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        transformer = Transformer(self.model_path, model_kwargs={"dtype": getattr(torch, self.dtype)})
        pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode=ST_POOLING[self.cfg.embed])
        model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device=self.device)
        start = time.perf_counter()
        vectors = model.encode(self.texts, convert_to_numpy=True, show_progress_bar=False)
        seconds = time.perf_counter() - start
        tokens = sum(map(len, self.ids))  # it pads each batch of 32 (by length) to its longest: not counted here
        return Result("sentence_transformers", seconds, list(vectors), 0, tokens, 0, 0)

    def run_continuous(self) -> Result:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        c = self.cfg
        config = GenerationConfig(max_new_tokens=max(self.new), do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                                  pad_token_id=self.tokenizer.pad_token_id)
        cache = ContinuousBatchingConfig(num_blocks=c.cb_num_blocks, page_size=c.cb_page_size,
                                         max_batch_tokens=c.cb_max_batch_tokens)
        results = {}
        start = time.perf_counter()
        with torch.inference_mode(), self.model.continuous_batching_context_manager(
                generation_config=config, continuous_batching_config=cache, block=True, timeout=30) as manager:
            ids = [manager.add_request(p, max_new_tokens=m) for p, m in zip(self.ids, self.new)]
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    results[r.request_id] = r
        seconds = time.perf_counter() - start
        eos = self.tokenizer.eos_token_id
        texts, generated = [], 0
        for rid in ids:
            tokens = list(results[rid].generated_tokens)
            generated += len(tokens)
            texts.append(self.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens,
                                               skip_special_tokens=True))
        total = sum(map(len, self.ids))
        return Result("continuous", seconds, texts, generated, total, total, generated)  # packed: no padding

    def run_ray_job(self) -> Result:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from lmbatch.config import ClusterConfig, GenerationOptions, InputConfig, JobConfig, ModelConfig, OutputConfig
        from lmbatch.pipeline import run

        c = self.cfg
        source = self.workdir / "prompts.parquet"
        if not source.exists():
            pq.write_table(pa.table({"id": list(range(len(self.texts))), "prompt": self.texts,
                                     "max_new_tokens": self.new}), source)
        out = Path(tempfile.mkdtemp(prefix="ray-job-", dir=self.workdir))
        job = JobConfig(
            input=InputConfig(path=str(source), param_columns=["max_new_tokens"], keep_columns=[],
                              on_duplicate_id="ignore"),
            output=OutputConfig(path=str(out / "output")),
            model=ModelConfig(path=self.model_path, dtype=self.dtype, kv_cache=c.kv_cache),
            generation=GenerationOptions(max_new_tokens=max(self.new)),
            batching=dataclasses.replace(c.batching, strategy="bucketed"),
            cluster=ClusterConfig(num_replicas=c.ray_replicas, cpus_per_replica=c.ray_cpus_per_replica,
                                  gpus_per_replica=1 if self.device == "cuda" else 0),
        )
        start = time.perf_counter()
        summary = run(job)
        seconds = time.perf_counter() - start
        table = pq.read_table(out / "output", columns=["generated_text"])
        m = summary["metrics"]
        padded = round(m["prompt_tokens"] / m["padding_efficiency"]) if m["padding_efficiency"] else 0
        slots = round(m["generated_tokens"] / m["decode_slot_efficiency"]) if m["decode_slot_efficiency"] else 0
        return Result("ray_job", seconds, table["generated_text"].to_pylist(), m["generated_tokens"],
                      m["prompt_tokens"], padded, slots, startup_seconds=m.get("startup_seconds"))

    def run(self, variant: str) -> Result:
        runner = {"bucketed": lambda: self.run_engine("bucketed", strategy="bucketed"),
                  "fixed": lambda: self.run_engine("fixed", strategy="fixed"),
                  "pipeline": self.run_pipeline, "continuous": self.run_continuous, "ray_job": self.run_ray_job,
                  "unshared": lambda: self.run_engine("unshared", strategy="bucketed", share_prefix=False),
                  "ungrouped": lambda: self.run_engine("ungrouped", strategy="bucketed", group_prefixes=False),
                  "sentence_transformers": self.run_sentence_transformers}
        with PeakSampler(lambda: tree_rss(psutil.Process()), interval=1.0) as rss:
            result = runner[variant]()
        result.peak_rss = rss.peak
        return result


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
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if cfg.embed not in (None, *EMBEDDING_POOLINGS):
        raise ValueError(f"embed must be {', '.join(EMBEDDING_POOLINGS)} or null, got {cfg.embed!r}")
    if cfg.embed and set(cfg.variants) & GENERATING:
        raise ValueError("embed compares the engine's variants (bucketed, fixed, unshared, ungrouped) and "
                         "sentence_transformers alone")
    if not cfg.embed and "sentence_transformers" in cfg.variants:
        raise ValueError("the sentence_transformers variant embeds: set embed")
    if cfg.embed and cfg.time_limit_s:  # its projection goes by decode steps, of which embedding has none
        raise ValueError("embed runs without time_limit_s")
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

    rows_n = len(bench.texts)
    notes = [f"{name} was stopped by time_limit_s={cfg.time_limit_s:g}: {r.rows_done:,} of {rows_n:,} rows in "
             f"{r.seconds:.1f}s; at that pace (by planned decode steps) the whole run would take about "
             f"{r.projected_seconds:,.1f}s." for name, r in best.items() if r.rows_done is not None]
    if "ray_job" in best and "bucketed" in best and best["ray_job"].startup_seconds is not None:
        ray = best["ray_job"]
        steady = best["bucketed"].seconds / max(ray.seconds - ray.startup_seconds, 1e-9)
        notes.append(f"Ray Data job vs in-process bucketed engine: {best['bucketed'].seconds / ray.seconds:.3f}x "
                     f"end to end, {steady:.3f}x with its start-up ({ray.startup_seconds:.1f}s: Ray, replicas, "
                     "model loads) excluded.")
    if cfg.memory_bandwidth_gb_s and "bucketed" in best and best["bucketed"].decode_steps:
        notes.append(bandwidth_note(best["bucketed"], bench.model, cfg.memory_bandwidth_gb_s))
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
    report = {"config": dataclasses.asdict(cfg), "machine": machine, "baseline": baseline, "results": rows,
              "greedy_rows_differing_from_bucketed": same, "notes": notes}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown(rows, baseline, header) + "".join(f"\n{n}\n" for n in notes)
    (out_dir / "results.md").write_text(table)
    print(table)
    print(f"benchmark results in {out_dir}")
    return report
