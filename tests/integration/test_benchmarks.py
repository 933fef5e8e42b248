"""The benchmark jobs run end to end and report what they claim to (CI runs them at a small size)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from helpers.config import REPO
from lmbatch.bench.benchmark import BenchmarkConfig, run_benchmark
from lmbatch.bench.scale import ScaleConfig, run_scale


@pytest.mark.slow
def test_benchmark_job_compares_every_variant(tmp_path, short_tmp_path):
    # The benchmark's temporary files (model, prompts, the Ray job's output) go under TMPDIR and are
    # removed at the end.
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "num_prompts=24", "max_prompt_tokens=256",
                           f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(short_tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in short_tmp_path.iterdir() if p.name.startswith("lmbatch-bench-")] == []
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"bucketed", "fixed", "pipeline", "continuous", "ray_job"}
    assert report["greedy_rows_differing_from_bucketed"] == {"bucketed": 0, "fixed": 0, "continuous": 0, "ray_job": 0}
    assert rows["fixed"]["x_fixed"] == 1.0
    assert rows["bucketed"]["padding_efficiency"] > rows["fixed"]["padding_efficiency"]
    for r in rows.values():
        assert r["rows_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert "start-up" in report["notes"][0]
    assert (tmp_path / "results.md").read_text().count("\n|") >= 6


@pytest.mark.slow
def test_templated_preset_compares_sharing_a_prefix_with_not(tmp_path):
    """preset=templated at a toy size: prompts of two templates, the engine without computing their shared
    instructions once, computing them once with rows ordered by length alone, and with each template's rows
    bucketed apart; the same greedy texts every way."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "preset=templated", "model_shape=tiny",
                           "num_prompts=16", "max_prompt_tokens=64", "shared_prefix_tokens=40", "templates=2",
                           "batching.max_batch_rows=4", "variants=[unshared,ungrouped,bucketed]", "repeats=1",
                           f"hydra.run.dir={tmp_path}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["unshared", "ungrouped", "bucketed"]
    assert report["baseline"] == "unshared"
    assert report["greedy_rows_differing_from_bucketed"] == {"unshared": 0, "ungrouped": 0, "bucketed": 0}
    assert report["results"][2]["x_unshared"] > 0


def test_benchmark_embeds_with_the_engines_variants(tmp_path):
    """embed=mean: the engine's variants embed the prompts (nothing generated), the same vectors bucketed as
    in fixed batches of input order, with less padding; variants that cannot embed, and a time limit that
    would project by decode steps, are refused."""
    cfg = BenchmarkConfig(embed="mean", variants=["fixed", "bucketed"], num_prompts=24, max_prompt_tokens=256,
                          output_dir=str(tmp_path))
    report = run_benchmark(cfg)
    fixed, bucketed = report["results"]
    assert report["greedy_rows_differing_from_bucketed"] == {"fixed": 0, "bucketed": 0}
    assert fixed["generated_tokens_per_s"] == bucketed["generated_tokens_per_s"] == 0
    assert bucketed["padding_efficiency"] > fixed["padding_efficiency"] and bucketed["x_fixed"] > 0
    assert "embedded (mean pooling), nothing generated" in (tmp_path / "results.md").read_text()
    with pytest.raises(ValueError, match="embed compares the engine's variants"):
        run_benchmark(dataclasses.replace(cfg, variants=["bucketed", "pipeline"]))
    with pytest.raises(ValueError, match="embed runs without time_limit_s"):
        run_benchmark(dataclasses.replace(cfg, time_limit_s=60.0))
    with pytest.raises(ValueError, match="the sentence_transformers variant embeds: set embed"):
        run_benchmark(dataclasses.replace(cfg, embed=None, variants=["sentence_transformers"]))


def test_benchmark_embeds_with_an_encoder_beside_sentence_transformers(tmp_path):
    """An encoder shape (tiny_bert) embeds with the engine as sentence-transformers' encode() does (every
    vector within 1e-4), and is refused to generate."""
    cfg = BenchmarkConfig(model_shape="tiny_bert", embed="cls", variants=["bucketed", "sentence_transformers"],
                          num_prompts=24, max_prompt_tokens=256, output_dir=str(tmp_path))
    report = run_benchmark(cfg)
    assert report["greedy_rows_differing_from_bucketed"] == {"bucketed": 0, "sentence_transformers": 0}
    assert [r["variant"] for r in report["results"]] == cfg.variants
    with pytest.raises(ValueError, match="model_shape tiny_bert is an encoder, which only embeds: set embed"):
        run_benchmark(dataclasses.replace(cfg, embed=None, variants=["bucketed"]))


@pytest.mark.slow
def test_gpu_preset_runs_at_toy_size_on_cpu(tmp_path):
    """The GPU preset (its Qwen2.5-0.5B-shaped model, the static KV cache a GPU gets, its planner
    settings, its time limit and the bandwidth-limit report) on CPU in float32 (2 GB of weights):
    micro-batches of at most 4 rows and a limit that stops it after the first."""
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "preset=gpu", "kv_cache=static",
                           "device=cpu", "dtype=float32", "num_prompts=16", "max_prompt_tokens=128",
                           "min_new_tokens=4", "max_new_tokens=16", "batching.max_batch_rows=4",
                           "time_limit_s=0.000001", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["bucketed"]
    assert report["config"]["batching"]["chunk_rows"] == 16384  # batching=gpu, composed by the preset
    stopped, note = report["notes"]
    result = report["results"][0]
    assert stopped.startswith(f"bucketed was stopped by time_limit_s=1e-06: {result['rows_done']} of 16 rows")
    assert 1 <= result["rows_done"] <= 4 and result["projected_seconds"] > result["seconds"]
    # rows_per_s counts the rows done, not all 16 (both figures are rounded in the report)
    assert result["rows_done"] / result["rows_per_s"] == pytest.approx(result["seconds"], rel=0.01)
    assert note.startswith("Memory-bandwidth limit for decode = bandwidth / weight bytes x rows per step = 4,800 GB/s "
                           "/ 1.976 GB x ")  # 494M parameters in float32
    assert float(note.rsplit("= ", 1)[1].split()[0]) > 0  # measured / limit


@pytest.mark.slow
def test_scale_benchmark_keeps_driver_memory_flat(tmp_path):
    """engine=echo at 5k and 25k rows: every row exactly once (checked inside), driver memory flat."""
    report = run_scale(ScaleConfig(sizes=[5_000, 25_000], rows_per_file=500, chunk_rows=2048,
                                   compare_ray_data=False, work_dir=str(tmp_path)))
    small, large = report["results"]
    # 50 input files of 500 rows -> 14 parts of <= 2,048 rows (13 would leave one replica a chunk alone);
    # 5k rows are cut finer (1,250) so each of the 2 replicas gets two
    assert large["output_files"] == 14 and small["output_files"] == 4
    assert large["driver_rss_vs_smallest"] < 1.5
    assert large["object_store_peak_mb"] > 0  # Ray's own figure: the test extras install grpcio


@pytest.mark.slow
@pytest.mark.vllm
def test_benchmark_compares_plain_vllm_with_engine_vllm_in_process_and_as_a_job(tmp_path):
    """The vllm variants at a toy size (a model shape whose heads vLLM's CPU attention runs): plain vLLM, the
    same engine through lmbatch's requests, and the whole engine=vllm job, with the same greedy texts."""
    pytest.importorskip("vllm")
    cfg = BenchmarkConfig(model_shape="small", num_prompts=16, max_prompt_tokens=128, max_new_tokens=16,
                          variants=["vllm", "vllm_engine", "vllm_job"], output_dir=str(tmp_path))
    cfg.vllm.cpu_kvcache_space_gb = 1
    report = run_benchmark(cfg)
    rows = {r["variant"]: r for r in report["results"]}
    assert rows["vllm"]["x_vllm"] == 1.0 and all(r["rows_per_s"] > 0 for r in rows.values())
    assert report["greedy_rows_differing_from_bucketed"] == {"vllm": 0, "vllm_engine": 0, "vllm_job": 0}
    assert any(n.startswith("engine=vllm job vs plain vLLM: ") for n in report["notes"]), report["notes"]
