"""One model replica holding a vLLM engine (`engine=vllm`): the fast path, on GPUs and CPUs.

A replica hands vLLM a whole chunk of prepared requests as token ids (prepare has tokenized them and
rendered their chat templates, as for engine=hf) and vLLM schedules them continuously. Its token ids
come back through `texts`, so that texts are decoded, cut at stop strings and counted exactly as
engine=hf does it (vLLM's own detokenizer drops a trailing incomplete UTF-8 character that
transformers' shows as U+FFFD; so vLLM detokenizes only rows with stop strings). A row vLLM refuses
becomes an error row and the others of its chunk succeed; an engine that died (its core process killed, or
dead of an error) ends the replica's process, which Ray starts again and whose chunk is redone.
What this engine does not do (log-probabilities, choices, structured output, embeddings, classifying,
adapters) the plan refuses before Ray starts (`plan.engine_checks`).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import time
from typing import Callable, Optional, Sequence

from lmbatch.config import JobConfig
from lmbatch.engine.texts import Texts
from lmbatch.engine.types import Completion, EngineStats, Request, error_rows

log = logging.getLogger(__name__)

WARM_UP_TOKENS = 8
"""A replica generates this many tokens as it loads, counted in start-up, so that its first chunk does not
pay for vLLM's first steps. (Its first large call after start-up stays about 1.7x slower than later ones:
64 warm-up prompts of 1 to 256 tokens did not change that, so the warm-up stays this small.)"""

REPORT_EVERY_S = 1.0
"""How often a replica tells the rows it finished inside a chunk (the progress line, the stall watchdog)."""


def engine_arguments(job: JobConfig, model_path: str, gpus: float) -> dict:
    """The keyword arguments of `vllm.LLM` for a job's replica holding `gpus` GPUs."""
    v = job.vllm
    arguments = {
        "model": model_path, "tokenizer": model_path, "dtype": job.replica_dtype, "seed": job.generation.seed,
        "max_model_len": v.max_model_len, "max_num_seqs": v.max_num_seqs, "enforce_eager": v.enforce_eager,
        "enable_prefix_caching": v.enable_prefix_caching, "trust_remote_code": job.model.trust_remote_code,
        "skip_tokenizer_init": False,
    }
    if v.max_num_batched_tokens:
        arguments["max_num_batched_tokens"] = v.max_num_batched_tokens
    if gpus:
        arguments.update(gpu_memory_utilization=v.gpu_memory_utilization, tensor_parallel_size=max(1, int(gpus)))
    return arguments


def vllm_sampling(r: Request, ends: frozenset[int]):
    """A row's vLLM SamplingParams: its own seed, its stop strings and ending tokens, its token limit; only
    its final output is sent back (its samples together)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    p = r.params
    sampled = dict(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k or -1, min_p=p.min_p) if p.do_sample \
        else dict(temperature=0.0)
    return VLLMSamplingParams(
        n=p.num_return_sequences, max_tokens=r.max_new_tokens, seed=r.seed, stop=list(p.stop),
        stop_token_ids=sorted(ends), include_stop_str_in_output=True, detokenize=bool(p.stop),
        repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty, output_kind=RequestOutputKind.FINAL_ONLY, **sampled)


class VLLMEngine:
    def __init__(self, llm, tokenizer, eos_ids: set[int]):
        self.llm, self.tokenizer = llm, tokenizer
        self.texts = Texts(tokenizer, eos_ids)
        self.stats = EngineStats()
        self.request_ids = itertools.count()

    @classmethod
    def load(cls, model_path: str, job: JobConfig, gpus: float = 0) -> "VLLMEngine":
        """Start vLLM once per replica, then warm it up (`WARM_UP_TOKENS`)."""
        # vLLM's CPU backend otherwise reserves most of the machine's free memory for its KV cache
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{job.vllm.cpu_kvcache_space_gb:g}"
        from vllm import LLM

        from lmbatch.models.architecture import ending_ids, load_generation_config
        from lmbatch.models.tokens import load_tokenizer

        arguments = engine_arguments(job, model_path, gpus)
        try:
            llm = LLM(**arguments)
        except RuntimeError as e:  # seen once in three restarts after a killed engine: "Engine core
            # initialization failed ... Failed core proc(s): {}", no process failed; a second start works
            log.warning("vLLM's engine did not start (%s); starting it again", e)
            llm = LLM(**arguments)
        tokenizer = load_tokenizer(model_path, job.model.trust_remote_code)
        eos_ids = ending_ids(load_generation_config(model_path).eos_token_id, tokenizer)  # as engine=hf ends rows
        engine = cls(llm, tokenizer, eos_ids)
        engine.generate([Request(-1, [tokenizer.eos_token_id or 0] * 4, WARM_UP_TOKENS)])
        engine.stats = EngineStats()  # the warm-up is start-up's
        return engine

    def close(self) -> None:
        """Stop the engine's processes (they would outlive an interpreter that exits without it)."""
        self.llm.llm_engine.engine_core.shutdown()

    def generate(self, requests: Sequence[Request],
                 on_batch: Optional[Callable[[list[Completion]], None]] = None) -> list[Completion]:
        """Complete every request: the whole chunk is queued in vLLM at once (it schedules continuously);
        `on_batch` is told the rows done every `REPORT_EVERY_S`, so the progress line moves inside a chunk."""
        if not requests:
            return []
        self.stats.micro_batches += 1
        queued, done = self._enqueue(list(requests))
        reported, last_report = 0, time.monotonic()
        engine = self.llm.llm_engine
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        done += self._finish(queued.pop(output.request_id), output)
                if on_batch and len(done) > reported and time.monotonic() - last_report >= REPORT_EVERY_S:
                    on_batch(done[reported:])
                    reported, last_report = len(done), time.monotonic()
        except Exception as e:  # noqa: BLE001 - nothing of vLLM's state can be trusted after a failed step
            _end_process(e)
        if on_batch and len(done) > reported:
            on_batch(done[reported:])
        position = {r.key: i for i, r in enumerate(requests)}  # in the order asked, as vLLM's generate
        return sorted(done, key=lambda c: (position[c.key], c.sample_index))

    def _enqueue(self, requests: list[Request]) -> tuple[dict, list[Completion]]:
        """Queue the requests in vLLM: their ids, and an error row for each one vLLM refuses (a prompt past
        max_model_len, ...)."""
        from vllm.inputs import TokensPrompt

        queued, refused = {}, []
        for r in requests:
            request_id = str(next(self.request_ids))
            try:
                self.llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=list(r.prompt_ids)),
                                                vllm_sampling(r, self.texts.ends(r.params.stop)))
                queued[request_id] = r
            except Exception as e:  # noqa: BLE001 - the row's own error becomes its error row
                if _engine_dead(e):
                    _end_process(e)
                message = f"generation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                refused += error_rows(r, message)
        return queued, refused

    def _finish(self, r: Request, output) -> list[Completion]:
        """A row's completions from vLLM's token ids, finished as engine=hf finishes them (`Texts`)."""
        samples = sorted(output.outputs, key=lambda o: o.index)
        generated = sum(len(s.token_ids) for s in samples)
        self.stats.generated_tokens += generated
        self.stats.decode_slots += generated
        self.stats.prompt_tokens += len(r.prompt_ids)
        self.stats.padded_prompt_tokens += len(r.prompt_ids)  # no padding
        return [self.texts.finish(r, i, list(s.token_ids)) for i, s in enumerate(samples)]


def _engine_dead(error: BaseException) -> bool:
    return type(error).__name__ == "EngineDeadError" or "EngineCore" in str(error) and "died" in str(error)


def _end_process(error: BaseException) -> None:
    """vLLM's engine is gone, or cannot be trusted: so is this replica. Ray starts its process again (with a
    new engine) and gives its chunk to a replica; nothing of the chunk was written. The engine's own
    processes go first: left alone, an engine core whose replica ended lives on (seen here)."""
    log.error("the vLLM engine of this replica failed (%s): ending the replica's process, which Ray starts again",
              error)
    for child in multiprocessing.active_children():
        child.kill()
    logging.shutdown()
    os._exit(1)
