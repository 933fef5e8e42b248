"""The benchmark's variants (`benchmark`): each runs the workload one way, timed, and counts the
tokens it computed, so that padding and decode slots compare across them."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import psutil

from lmbatch.bench.workload import build_workload
from lmbatch.engine.batching import decode_steps
from lmbatch.report.samplers import PeakSampler
from lmbatch.report.summary import megabytes, ratio

if TYPE_CHECKING:
    from lmbatch.bench.benchmark import BenchmarkConfig

ST_POOLING = {"cls": "cls", "mean": "mean", "last": "lasttoken"}
"""generation.embedding's poolings by sentence-transformers' names."""


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
            "padding_efficiency": ratio(self.prompt_tokens, self.padded_prompt_tokens),
            "decode_slot_efficiency": ratio(self.generated_tokens, self.decode_slots),
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
        from lmbatch.models.tokens import load_tokenizer

        self.cfg, self.model_path, self.workdir = cfg, model_path, workdir
        self._vllm, self.vllm_startup = None, None
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
        from lmbatch.engine.hf import HFEngine
        from lmbatch.engine.types import Pooling, Request, SamplingParams

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

    def text_until_eos(self, tokens: list[int]) -> str:
        """A generator's new tokens as the row's text: decoded up to the first EOS."""
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode(tokens[: tokens.index(eos)] if eos in tokens else tokens, skip_special_tokens=True)

    def run_continuous(self) -> Result:
        import torch
        from transformers import ContinuousBatchingConfig, GenerationConfig

        c = self.cfg
        config = GenerationConfig(max_new_tokens=max(self.new), do_sample=False,
                                  eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
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
        texts, generated = [], 0
        for rid in ids:
            tokens = list(results[rid].generated_tokens)
            generated += len(tokens)
            texts.append(self.text_until_eos(tokens))
        total = sum(map(len, self.ids))
        return Result("continuous", seconds, texts, generated, total, total, generated)  # packed: no padding

    def job_config(self, engine: str, replicas: int, out: Path):
        """The benchmark's workload as a job (Parquet in, Parquet out) on `replicas` replicas of `engine`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from lmbatch.config import ClusterConfig, GenerationOptions, InputConfig, JobConfig, ModelConfig, OutputConfig

        c = self.cfg
        source = self.workdir / "prompts.parquet"
        if not source.exists():
            pq.write_table(pa.table({"id": list(range(len(self.texts))), "prompt": self.texts,
                                     "max_new_tokens": self.new}), source)
        return JobConfig(
            input=InputConfig(path=str(source), param_columns=["max_new_tokens"], keep_columns=[],
                              on_duplicate_id="ignore"),
            output=OutputConfig(path=str(out)),
            model=ModelConfig(path=self.model_path, dtype=self.dtype, kv_cache=c.kv_cache),
            generation=GenerationOptions(max_new_tokens=max(self.new)),
            batching=dataclasses.replace(c.batching, strategy="bucketed"),
            cluster=ClusterConfig(num_replicas=replicas, cpus_per_replica=c.ray_cpus_per_replica,
                                  gpus_per_replica=1 if self.device == "cuda" else 0),
            vllm=c.vllm, engine=engine)

    def run_job(self, variant: str, engine: str, replicas: int) -> Result:
        """The whole job end to end, from Parquet to Parquet, its start-up (Ray, replicas, model loads) apart."""
        import pyarrow.parquet as pq

        from lmbatch.pipeline.run import run

        out = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=self.workdir)) / "output"
        job = self.job_config(engine, replicas, out)
        start = time.perf_counter()
        summary = run(job)
        seconds = time.perf_counter() - start
        texts = pq.read_table(out, columns=["id", "generated_text"]).sort_by("id")["generated_text"].to_pylist()
        m = summary["metrics"]
        padded = round(m["prompt_tokens"] / m["padding_efficiency"]) if m["padding_efficiency"] else 0
        slots = round(m["generated_tokens"] / m["decode_slot_efficiency"]) if m["decode_slot_efficiency"] else 0
        return Result(variant, seconds, texts, m["generated_tokens"], m["prompt_tokens"], padded, slots,
                      startup_seconds=m.get("startup_seconds"))

    def vllm_engine(self):
        """One vLLM engine, as a replica holds it, for the vllm and vllm_engine variants: started and warmed up
        once (its start-up reported apart), so both time the same engine."""
        if self._vllm is None:
            from lmbatch.engine.vllm import VLLMEngine

            start = time.perf_counter()
            self._vllm = VLLMEngine.load(self.model_path, self.job_config("vllm", 1, self.workdir / "unused"),
                                         gpus=1 if self.device == "cuda" else 0)
            self.vllm_startup = time.perf_counter() - start
        return self._vllm

    def close(self) -> None:
        if self._vllm is not None:
            self._vllm.close()

    def run_vllm(self) -> Result:
        """Plain vLLM offline, what a user writes instead: `LLM.generate` on the token ids, greedy, each row's
        max_tokens."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = self.vllm_engine().llm
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in self.ids]
        params = [SamplingParams(max_tokens=m, temperature=0.0) for m in self.new]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        texts = list(map(self.text_until_eos, tokens))
        generated, total = sum(map(len, tokens)), sum(map(len, self.ids))
        return Result("vllm", seconds, texts, generated, total, total, generated, startup_seconds=self.vllm_startup)

    def run_vllm_engine(self) -> Result:
        """engine=vllm as a replica runs it, in-process: the same engine as `vllm`, through lmbatch's requests."""
        from lmbatch.engine.types import EngineStats, Request

        engine = self.vllm_engine()
        engine.stats = EngineStats()
        requests = [Request(i, ids, m) for i, (ids, m) in enumerate(zip(self.ids, self.new))]
        start = time.perf_counter()
        done = engine.generate(requests)
        seconds = time.perf_counter() - start
        texts = [None] * len(requests)
        for c in done:
            texts[c.key] = c.text
        s = engine.stats
        return Result("vllm_engine", seconds, texts, s.generated_tokens, s.prompt_tokens, s.padded_prompt_tokens,
                      s.decode_slots, startup_seconds=self.vllm_startup)

    def run(self, variant: str) -> Result:
        runner = {"bucketed": lambda: self.run_engine("bucketed", strategy="bucketed"),
                  "fixed": lambda: self.run_engine("fixed", strategy="fixed"),
                  "pipeline": self.run_pipeline, "continuous": self.run_continuous,
                  "ray_job": lambda: self.run_job("ray_job", "hf", self.cfg.ray_replicas),
                  "vllm": self.run_vllm, "vllm_engine": self.run_vllm_engine,
                  "vllm_job": lambda: self.run_job("vllm_job", "vllm", self.cfg.vllm_replicas),
                  "unshared": lambda: self.run_engine("unshared", strategy="bucketed", share_prefix=False),
                  "ungrouped": lambda: self.run_engine("ungrouped", strategy="bucketed", group_prefixes=False),
                  "sentence_transformers": self.run_sentence_transformers}
        with PeakSampler(lambda: tree_rss(psutil.Process()), interval=1.0) as rss:
            result = runner[variant]()
        result.peak_rss = rss.peak
        return result
