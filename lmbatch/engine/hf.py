"""One model replica: generate planned micro-batches and decode, with a model `loading` loaded once.

`HFEngine` runs transformers' `generate` on left-padded micro-batches planned by
`batching`. A micro-batch that raises (an out-of-memory error, or a row that breaks
the model) is split in halves and retried, down to single rows, so one bad row becomes one
error row and its neighbours still succeed. An out-of-memory error also halves the token budget
the rest of the replica's micro-batches are planned under, so a budget too large for the device
costs one failed micro-batch, not one per micro-batch. Sampling, choices, structured output, stop
strings, the penalties and log-probabilities are lmbatch's own processors (`decoding`), so that
a row's output does not depend on its neighbours; prompts and choices of several tokens are scored by
forward passes of their own (`scoring`). A prefix all prompts of a micro-batch share is
computed once (`prefix`); several adapters of the model take turns by micro-batch
(model.adapters). The engine without a model is `echo`; a row's text is finished in `texts`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch

from lmbatch.config import BatchingConfig, ModelConfig
from lmbatch.decoding.logprobs import TokenLogprobs, TokenTexts, first_tokens
from lmbatch.decoding.processors import Choices, Guided, OutputPenalties, PerRowSampler, RepetitionPenalty
from lmbatch.decoding.stopping import StopStrings
from lmbatch.decoding.structured import Indexes, PatternError
from lmbatch.engine.loading import choose_kv_cache, load_model
from lmbatch.engine.pooling import EncoderReading, classify_prompts, embed_prompts
from lmbatch.engine.prefix import layout, prefix_cache
from lmbatch.engine.requests import padded_tokens, plan_requests, row_seed, shared_prefix
from lmbatch.engine.scoring import cache_keyword, score_choices, score_prompts
from lmbatch.engine.texts import Texts
from lmbatch.engine.types import Completion, EngineStats, Request, error_rows
from lmbatch.models import is_classifier, reads_both_ways
from lmbatch.models.architecture import ending_ids, special_tokens_only

log = logging.getLogger(__name__)


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error).lower()


class EngineFailed(RuntimeError):
    """Generation fails for a reason that is not in the rows, so isolating rows cannot help: every
    later row of the job would be written as an error row. The job stops instead (a rerun resumes):
    the GPU failed so that this process cannot use it (CUDA's sticky errors: an illegal memory
    access, a device-side assert), or no row has succeeded yet and many have failed (a broken model
    or engine, a tokenizer that does not match the model)."""


FAILED_ROWS_BEFORE_ANY_SUCCESS = 16
"""Rows failing alone, none done yet, that say the engine is broken: a bad row is one in thousands."""


class BatchInputs(NamedTuple):
    """A micro-batch laid out for generate."""
    prompts: tuple
    """(input_ids, attention_mask) of the whole prompts, left-padded: what the prompts are scored on."""
    input_ids: torch.Tensor
    """What generate is handed: the prompts past a shared prefix, one row per sequence."""
    attention_mask: torch.Tensor
    longest: int
    """Where generation starts in input_ids."""
    shared: int
    """Prompt tokens computed once, into `cache`, for every sequence (0: none)."""
    cache: Any
    """The shared prefix's KV cache, or None."""


class Steering(NamedTuple):
    """What steers a micro-batch's generate, and what the readings after it need to know of it."""
    processors: list
    criteria: list
    logprobs: Optional[TokenLogprobs]
    scored: bool
    """Whether every choice's log-probability is asked for."""
    at_first_step: bool
    """Whether those are read at the first step (choices of one token each)."""


class HFEngine:
    def __init__(self, model, tokenizer, batching: BatchingConfig, kv_cache: Optional[str] = None, adapters=None):
        """Wrap a loaded model and its (left-padding) tokenizer; `HFEngine.load` loads them. `adapters`: the
        peft model holding model.adapters, whose layers are in `model`."""
        self.model, self.tokenizer, self.adapters = model, tokenizer, adapters
        self.kv_cache = choose_kv_cache(kv_cache, str(model.device))
        # An encoder only embeds (or classifies), reading each micro-batch as this says; None for a decoder.
        self.encoder = EncoderReading.of(model, tokenizer) if reads_both_ways(model.config) else None
        # What the model is that cannot generate, if it is one: its rows must not ask it to.
        self.cannot_generate = ("a classifier" if is_classifier(model.config) else
                                "an encoder, which reads text both ways" if self.encoder else None)
        generation_config = getattr(model, "generation_config", None)  # none in an encoder or a classifier
        self.eos_ids = ending_ids(getattr(generation_config, "eos_token_id", None), self.tokenizer)
        self.texts = Texts(self.tokenizer, self.eos_ids)
        if generation_config:
            self.model.generation_config = special_tokens_only(generation_config)
        # No pad token and no EOS to pad with (load_tokenizer pads with EOS): any id will do, as
        # padding is masked out.
        self.pad_id = 0 if self.tokenizer.pad_token_id is None else self.tokenizer.pad_token_id
        self.batching = batching
        self.stats = EngineStats()
        self.rows_failed_alone = 0  # not out of memory: with none done yet, many say the engine is broken
        self._indexes: Optional[Indexes] = None  # the compiled patterns of structured output, made on first use
        self._each_token: Optional[TokenTexts] = None  # each token's text alone, for generation.top_logprobs

    @classmethod
    def load(cls, model_path: str, model: ModelConfig, batching: BatchingConfig,
             device: Optional[str] = None, threads: Optional[int] = None) -> "HFEngine":
        """Load once per replica (`loading`): on `device` (default: CUDA when there is one), in the
        configured dtype, with `threads` torch threads."""
        if threads:
            torch.set_num_threads(threads)
        loaded, tokenizer, adapters = load_model(model_path, model, device)
        return cls(loaded, tokenizer, batching, model.kv_cache, adapters)

    # -- planning ---------------------------------------------------------------------------
    def plan(self, requests: Sequence[Request]) -> list[list[Request]]:
        return [[requests[i] for i in batch] for batch in plan_requests(self.batching, requests)]

    def generate(self, requests: Sequence[Request],
                 on_batch: Optional[Callable[[list[Completion]], None]] = None) -> list[Completion]:
        """Complete every request; `on_batch` is told each micro-batch's completions as they come."""
        completions = self._unfollowable(requests)
        if completions:
            if on_batch:
                on_batch(completions)
            refused = {c.key for c in completions}
            requests = [r for r in requests if r.key not in refused]
        batches = self.plan(requests)
        while batches:
            budget = self.batching
            done = self._generate_isolating(batches.pop(0))
            completions.extend(done)
            if on_batch:
                on_batch(done)
            if self.batching is not budget:  # out of memory: the rest is planned under the smaller budget
                batches = self.plan([r for batch in batches for r in batch])
        return completions

    def _unfollowable(self, requests: Sequence[Request]) -> list[Completion]:
        """Error completions for the rows that ask an encoder or a classifier to generate (a row's
        max_new_tokens), and those held to a pattern (json_schema or regex) that no text of this tokenizer's
        can follow (compiling each pattern once, for the batches that follow it)."""
        failed = []
        for r in requests:
            if self.cannot_generate and r.max_new_tokens:  # the job's own setting was refused as it started
                message = (f"invalid parameter: max_new_tokens must be 0: the model ({type(self.model).__name__}) is "
                           f"{self.cannot_generate}, and cannot generate")
                failed += error_rows(r, message)
            elif r.pattern is not None:
                try:
                    if self._indexes is None:
                        self._indexes = Indexes(self.tokenizer, self.eos_ids)
                    self._indexes.index(r.pattern)
                except PatternError as e:
                    failed += error_rows(r, str(e)[:500])
        return failed

    # -- failure isolation ------------------------------------------------------------------
    def _generate_isolating(self, batch: list[Request]) -> list[Completion]:
        try:
            return self._generate_batch(batch)
        except Exception as error:  # noqa: BLE001 - any failure is isolated to the rows causing it
            oom = _is_oom(error)
            self._stop_unless_the_rows_failed(error, oom, alone=len(batch) == 1)
            if oom:
                self._free_memory()
                if len(batch) > 1:
                    self._shrink_budget(batch)
            if len(batch) == 1:
                kind = "out of memory" if oom else f"generation failed: {type(error).__name__}"
                log.warning("row %s: %s: %s", batch[0].key, kind, error)
                return error_rows(batch[0], f"{kind}: {error}".strip()[:500])
            log.warning("micro-batch of %d rows failed (%s%s); retrying in halves", len(batch),
                        "out of memory: " if oom else "", type(error).__name__)
            self.stats.split_retries += 1
            half = len(batch) // 2
            return self._generate_isolating(batch[:half]) + self._generate_isolating(batch[half:])

    def _stop_unless_the_rows_failed(self, error: Exception, oom: bool, alone: bool) -> None:
        """Raise EngineFailed when the failure is not in the rows (see there for when)."""
        cause = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
        if not oom and self._device_lost():
            log.error("the device failed", exc_info=error)
            raise EngineFailed(f"the {self.model.device} device failed and this process can no longer use it "
                               f"({cause}); the job stops rather than write every later row as an error row") from None
        self.rows_failed_alone += alone and not oom
        if self.rows_failed_alone >= FAILED_ROWS_BEFORE_ANY_SUCCESS and not self.stats.micro_batches:
            log.error("a row failed alone", exc_info=error)
            raise EngineFailed(f"generation failed for each of the first {self.rows_failed_alone} rows tried alone "
                               f"and has not succeeded for any ({cause}): the model or engine is broken, not the "
                               "rows; the job stops rather than write every row as an error row") from None

    def _shrink_budget(self, batch: list[Request]) -> None:
        """Plan later micro-batches under half the size of one that ran out of memory. The size counts
        the batch's longest prompt, so a batch that failed for one huge row leaves a budget that
        ordinary rows still fill; a single row never shrinks it (it fails alone, as an error row)."""
        b = self.batching
        shrunk = dataclasses.replace(b, max_batch_tokens=min(b.max_batch_tokens, padded_tokens(batch) // 2),
                                     fixed_batch_size=min(b.fixed_batch_size, len(batch) // 2))
        if shrunk != b:
            self.batching = shrunk
            log.warning("out of memory: later micro-batches are planned with max_batch_tokens=%d and "
                        "fixed_batch_size=%d (were %d and %d)", self.batching.max_batch_tokens,
                        self.batching.fixed_batch_size, b.max_batch_tokens, b.fixed_batch_size)

    def _device_lost(self) -> bool:
        """After a failure: whether the model's device no longer runs even a trivial kernel."""
        device = self.model.device
        if device.type == "cpu":
            return False
        try:
            torch.ones(1, device=device).add_(1).cpu()  # .cpu() waits for the kernel: its error shows here
            return False
        except Exception:  # noqa: BLE001 - whatever the device raises, it cannot be used
            return True

    def _free_memory(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- one micro-batch --------------------------------------------------------------------
    def _generate_batch(self, batch: list[Request]) -> list[Completion]:
        """One micro-batch through generate: its inputs laid out (a shared prefix computed once), the
        processors its settings need, the new tokens cut into completions, then the prompt readings."""
        params = batch[0].params
        self._use_adapter(params.adapter)
        ends = self.texts.ends(params.stop)
        n = params.num_return_sequences
        most = max(r.max_new_tokens for r in batch)  # 0: the prompts are only scored or embedded
        inputs = self._inputs(batch, n, most)
        config = self._generation_config(ends, most, static=inputs.cache is None)
        steer = self._steering(batch, inputs, config.max_new_tokens, ends)
        start = time.perf_counter()
        new_tokens: list[list[int]] = [[] for _ in range(len(inputs.input_ids))]
        if most:
            device = self.model.device
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=inputs.input_ids.to(device), attention_mask=inputs.attention_mask.to(device),
                    generation_config=config, logits_processor=steer.processors, stopping_criteria=steer.criteria,
                    **({cache_keyword(self.model): inputs.cache} if inputs.cache is not None else {}),
                )
            new_tokens = out[:, inputs.longest:].tolist()
            self.stats.shared_prefix_tokens += inputs.shared * (len(batch) * n - 1)
        steps = len(new_tokens[0])
        log.debug("micro-batch of %d rows, prompts up to %d tokens, %d decode steps: %.2fs", len(batch), inputs.longest,
                  steps, time.perf_counter() - start)
        completions = self._completions(batch, new_tokens, ends, steer.logprobs)
        self._read_prompts(batch, completions, inputs.prompts, steer)
        self._count(batch, steps, completions)
        return completions

    def _inputs(self, batch: list[Request], n: int, most: int) -> BatchInputs:
        """The micro-batch left-padded, its shared prefix (if any) computed once into a cache, and each
        row repeated n times: one sequence per (row, sample), so that each gets its own random stream."""
        prompts = layout(batch, 0, self.pad_id)  # left-padded, as the prompts are scored
        shared = shared_prefix(batch) if self.batching.share_prefix else 0
        cache = prefix_cache(self.model, batch[0].prompt_ids[:shared], len(batch) * n, self.kv_cache,
                             prompts[0].shape[1] + most) if shared else None
        if cache is None:
            shared = 0
        input_ids, attention_mask = layout(batch, shared, self.pad_id) if shared else prompts
        longest = input_ids.shape[1]  # where generation starts
        if n > 1:
            input_ids, attention_mask = input_ids.repeat_interleave(n, 0), attention_mask.repeat_interleave(n, 0)
        return BatchInputs(prompts, input_ids, attention_mask, longest, shared, cache)

    def _generation_config(self, ends: frozenset[int], most: int, static: bool):
        from transformers import GenerationConfig

        # Decoding is greedy over scores that the sampler (if any) has already reduced to its draw.
        return GenerationConfig(
            max_new_tokens=max(most, 1),  # it refuses 0; generate is then not called
            do_sample=False, temperature=None, top_p=None, top_k=None,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(ends) or None,
            # A static cache (generate's, or the shared prefix's) is sized to this batch (longest prompt + most
            # new tokens, what the planner budgets). No auto-compile: every micro-batch has another shape.
            cache_implementation="static" if self.kv_cache == "static" and static else None,
            disable_compile=True,
        )

    def _steering(self, batch: list[Request], inputs: BatchInputs, max_new_tokens: int,
                  ends: frozenset[int]) -> Steering:
        """The logits processors and stopping criteria the micro-batch's settings need, in the order they
        apply: log-probabilities read first (the model's own) and last (what was drawn from)."""
        params, n, longest = batch[0].params, batch[0].params.num_return_sequences, inputs.longest
        device = self.model.device
        processors = []
        scored = params.logprobs and any(r.choices for r in batch)  # every choice's log-probability
        # Choices of one token each (labels, in a real vocabulary, mostly are) are all scored at the first
        # step, from the scores generate computes anyway; longer ones need forward passes of their own.
        at_first_step = scored and all(len(ids) == 1 for r in batch for _, ids in r.choices)
        logprobs = TokenLogprobs(torch.tensor(first_tokens(batch, n), device=device) if at_first_step else None,
                                 params.top_logprobs) if params.logprobs else None
        if logprobs:
            processors.append(logprobs.first)
        if params.repetition_penalty != 1.0:
            processors.append(RepetitionPenalty(params.repetition_penalty, inputs.attention_mask.to(device)))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(OutputPenalties(params.presence_penalty, params.frequency_penalty, longest))
        if any(r.choices for r in batch):
            if not self.eos_ids:
                raise ValueError("generation.choices needs an EOS token to end a row with, and the tokenizer and "
                                 "generation config name none")
            processors.append(Choices([r.choices for r in batch for _ in range(n)], longest, min(self.eos_ids)))
        if any(r.pattern for r in batch):
            processors.append(Guided([self._indexes.guide(r.pattern) if r.pattern else None
                                      for r in batch for _ in range(n)], longest))
        if params.do_sample:
            processors.append(PerRowSampler(params, [row_seed(r.seed, s) for r in batch for s in range(n)], device,
                                            max_new_tokens))
        if logprobs:
            processors.append(logprobs.last)
        text_stops = tuple(s for s in params.stop if s not in self.texts.special_tokens)
        criteria = [StopStrings(self.tokenizer, text_stops, longest, ends | {self.pad_id})] if text_stops else []
        return Steering(processors, criteria, logprobs, scored, at_first_step)

    def _completions(self, batch: list[Request], new_tokens: list[list[int]], ends: frozenset[int],
                     logprobs: Optional[TokenLogprobs]) -> list[Completion]:
        """Each sequence's new tokens cut at its row's limit and stop, with its log-probabilities."""
        params, n = batch[0].params, batch[0].params.num_return_sequences
        token_logprobs = logprobs.per_sequence() if logprobs else None
        top_logprobs = logprobs.top_per_sequence(len(new_tokens)) if params.top_logprobs else None
        completions = []
        for i, r in enumerate(batch):
            for s in range(n):
                tokens = new_tokens[i * n + s][: r.max_new_tokens]
                c = self.texts.finish(r, s, tokens)
                if logprobs:  # the tokens counted, less an EOS (or special stop token) that ended the row
                    counted = c.num_generated_tokens - (c.num_generated_tokens > 0 and
                                                        tokens[c.num_generated_tokens - 1] in ends)
                    counted_logprobs = token_logprobs[i * n + s][:counted] if counted else []
                    c.logprob = sum(counted_logprobs, 0.0)
                    if params.top_logprobs:
                        c.token_logprobs = self._token_texts().token_logprobs(
                            tokens[:counted], counted_logprobs, *(top[i * n + s, :counted] for top in top_logprobs))
                completions.append(c)
        return completions

    def _read_prompts(self, batch: list[Request], completions: list[Completion], prompts, steer: Steering) -> None:
        """What the rows ask of their prompts besides new tokens: the prompt's log-probability, its
        embedding, its label, each choice's log-probability."""
        params, n = batch[0].params, batch[0].params.num_return_sequences
        if params.prompt_logprobs:
            prompt_scores = score_prompts(self.model, batch, *prompts)
            for c in completions:
                c.prompt_logprob = prompt_scores[c.key]
        if params.embedding:
            embeddings = embed_prompts(self.model, batch, *prompts, params.embedding, self.encoder)
            for c in completions:
                c.embedding = embeddings[c.key]
        if params.classify:
            labels = classify_prompts(self.model, batch, *prompts, self.encoder)
            for c in completions:
                c.label, c.label_scores = labels[c.key]
        if steer.scored:
            if steer.at_first_step:
                first_step = steer.logprobs.first_step.tolist()
                scores = {r.key: first_step[i * n][:len(r.choices)] for i, r in enumerate(batch) if r.choices}
            else:
                scores = score_choices(self.model, self.pad_id, batch, *prompts)
            for c in completions:
                c.choice_logprobs = scores.get(c.key)

    def _use_adapter(self, name: Optional[str]) -> None:
        """Switch model.adapters to the micro-batch's adapter (the planner gives each its own micro-batches),
        or off for rows of the model alone: every pass of the batch, generation and scoring, runs with it."""
        if self.adapters is None:
            return
        if name is None:
            self.adapters.base_model.disable_adapter_layers()
        else:
            self.adapters.base_model.enable_adapter_layers()
            self.adapters.set_adapter(name, inference_mode=True)

    def _token_texts(self) -> TokenTexts:
        if self._each_token is None:  # made on first use: only generation.top_logprobs needs it
            vocab_size = getattr(self.model.config.get_text_config(), "vocab_size", 0) or 0
            self._each_token = TokenTexts(self.tokenizer, vocab_size)
        return self._each_token

    def _count(self, batch: list[Request], steps: int, completions: list[Completion]) -> None:
        s = self.stats
        n = batch[0].params.num_return_sequences
        s.micro_batches += 1
        s.prompt_tokens += sum(len(r.prompt_ids) for r in batch)
        s.padded_prompt_tokens += len(batch) * max(len(r.prompt_ids) for r in batch)
        s.generated_tokens += sum(c.num_generated_tokens for c in completions)
        s.decode_slots += len(batch) * n * steps
        s.decode_steps += steps
