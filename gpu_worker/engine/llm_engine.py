"""The rank-0 engine loop: admit requests, step the batch, report each sampled token and each finished request.

The engine never handles text: it hands on (request, token) pairs and
finished requests' token ids, and a text stage
(:mod:`gpu_worker.engine.text_stage`, run off the decode thread when
serving) detokenizes them and matches stop strings.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from common.errors import InvalidConfigError, InvalidRequestError
from common.results import FinishReason, GenerationResult, Timings, TokenLogprob, Usage
from common.sampling import SamplingParams
from gpu_worker.models.config import ModelConfig
from gpu_worker.engine.block_manager import BlockManager
from gpu_worker.engine.engine_config import EngineConfig
from gpu_worker.engine.executor import Executor
from gpu_worker.engine.model_runner import RunnerSpec, kv_bytes_per_block
from gpu_worker.engine.logprobs import LogprobRequests, compute_logprobs, prompt_rows
from gpu_worker.engine.plan import logit_counts_for, order_decodes_first, pack_step
from gpu_worker.engine.sampler import Sampler
from gpu_worker.engine.scheduler import Scheduler, SchedulerConfig
from gpu_worker.engine.sequence import Priority, Sequence
from gpu_worker.weights.model_store import resolve_model
from common.heartbeat import HeartbeatSpec
from gpu_worker.models.tokenizer import Tokenizer

log = logging.getLogger("tpqueue.engine")


@dataclass(slots=True)
class SampledToken:
    """One sampled token of one request, without text; ``index`` counts the request's generated tokens from 0.

    ``finish_reason`` is set on the token that ended the request on the engine's side (EOS, a stop token
    id, max_tokens, the context length); ``logprob`` when the request asked for logprobs.
    """

    request_id: str
    index: int
    token_id: int
    sampled_at: float
    finish_reason: FinishReason | None = None
    logprob: TokenLogprob | None = None


@dataclass(slots=True)
class FinishedRequest:
    """A request the engine no longer runs: all its generated token ids (resumed ones included), no text."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int
    queue_s: float
    time_to_first_token_s: float
    total_s: float
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    def result(self, text: str, num_tokens: int | None = None,
               finish_reason: FinishReason | None = None) -> GenerationResult:
        """The request's result with ``text``, keeping only its first ``num_tokens`` tokens (None: all)."""
        kept = len(self.token_ids) if num_tokens is None else num_tokens
        return GenerationResult(
            request_id=self.request_id, text=text, token_ids=self.token_ids[:kept],
            finish_reason=finish_reason or self.finish_reason,
            usage=Usage(prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens, generated_tokens=kept),
            timings=Timings(queue_s=self.queue_s, time_to_first_token_s=self.time_to_first_token_s,
                            total_s=self.total_s),
            logprobs=None if self.logprobs is None else self.logprobs[:kept],
            prompt_logprobs=self.prompt_logprobs,
        )


@dataclass
class StepOutput:
    """What one step produced: each sampled token, and the requests that finished."""

    tokens: list[SampledToken] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)


@dataclass
class EngineStats:
    """Running totals since the engine started."""

    steps: int = 0
    computed_tokens: int = 0     # tokens run through the model (prefill chunks and decodes)
    generated_tokens: int = 0    # tokens sampled
    scheduled_seqs: int = 0      # sequences summed over steps (mean batch size = scheduled_seqs / steps)
    last_batch_size: int = 0     # sequences in the latest step


@dataclass
class _Request:
    seq: Sequence
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when the request asked


class LLMEngine:
    """Continuous batching over a tensor-parallel model; the driver of a worker group."""

    def __init__(self, config: EngineConfig, heartbeat: HeartbeatSpec | None = None):
        """Build the model on ``config.tp`` ranks; with ``heartbeat``, ranks 1.. report liveness to Redis."""
        self.config = config
        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise InvalidConfigError("device='cuda' was asked for, but torch sees no CUDA device")
        self.model_dir = resolve_model(config.model)
        self.model_config = ModelConfig.from_model_dir(self.model_dir)
        self.model_config.check_tp(config.tp)
        self.tokenizer = Tokenizer(self.model_dir)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | self.tokenizer.eos_token_ids
        num_blocks = config.num_kv_blocks or int(config.kv_cache_gb * 2**30 // kv_bytes_per_block(
            self.model_config, config.block_size, config.dtype, config.tp, config.kv_cache_dtype))
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings, num_blocks * config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens),
                                   self.block_manager)
        self.sampler = Sampler()
        spec = RunnerSpec(str(self.model_dir), config.dtype, device, config.block_size, num_blocks,
                          config.collective_timeout_s, max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=config.max_num_batched_tokens, quantization=config.quantization,
                          enforce_eager=config.enforce_eager, kv_cache_dtype=config.kv_cache_dtype)
        self.executor = Executor(spec, config.tp, config.start_timeout_s, heartbeat)
        self._requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        log.info("engine ready: %s, tp=%d, %s%s on %s, %d KV blocks of %d (%s), context %d",
                 self.model_dir.name, config.tp, config.dtype,
                 f" with {config.quantization} weights" if config.quantization else "", device, num_blocks,
                 config.block_size, "fp8 KV" if config.kv_cache_dtype == "fp8" else f"{config.dtype} KV",
                 self.max_model_len)

    # -- requests ------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                    priority: Priority = Priority.INTERACTIVE, resume_token_ids: list[int] = (),
                    resume_logprobs: list[TokenLogprob] | None = None) -> None:
        """Queue a tokenized prompt. Raises InvalidRequestError when it cannot be served.

        ``resume_token_ids`` are tokens this request already generated (and
        streamed) before an earlier run of it died: they are prefilled with
        the prompt, count as generated, and its tokens continue at index
        ``len(resume_token_ids)`` (the text stage rebuilds the text already
        sent from them). Greedy and seeded requests continue as the run that
        died would have (the sampler keys its draws by seed and token index).
        ``resume_logprobs`` are those tokens' log-probabilities as the earlier
        run streamed them (with ``sampling.logprobs``; entries with ``logprob``
        None where none were logged); the result's ``logprobs`` start with them.
        """
        if request_id in self._requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self.validate_prompt(prompt_token_ids)
        self._validate_resume(prompt_token_ids, resume_token_ids, sampling)
        if resume_logprobs is not None and [lp.token_id for lp in resume_logprobs] != list(resume_token_ids):
            raise InvalidRequestError("resume_logprobs must give one entry per resumed token, for the same tokens")
        seq = Sequence(request_id, list(prompt_token_ids), sampling, priority)
        request = _Request(seq)
        if sampling.logprobs is not None:
            request.logprobs = list(resume_logprobs or [TokenLogprob(token_id=t) for t in resume_token_ids])
        for token in resume_token_ids:
            seq.append_token(token)
        self._requests[request_id] = request
        self.scheduler.add(seq)

    def _validate_resume(self, prompt_token_ids, resume_token_ids, sampling: SamplingParams) -> None:
        if not resume_token_ids:
            return
        if len(resume_token_ids) >= sampling.max_tokens:
            raise InvalidRequestError(f"cannot resume after {len(resume_token_ids)} tokens: "
                                      f"max_tokens is {sampling.max_tokens}, so the request already finished")
        self.validate_prompt(list(prompt_token_ids) + list(resume_token_ids))

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty; give at least one token of text")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens, but this engine's context is "
                f"{self.max_model_len} tokens and must leave room for at least one generated token")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> FinishedRequest | None:
        """Stop a request now (a cancel, a deadline, a stop string the text stage found); None if it is not here."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        return self._finish(request, reason)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # -- the step --------------------------------------------------------------
    def step(self) -> StepOutput:
        """Schedule, run one forward pass on every rank, sample, and report the tokens and finished requests."""
        batch = self.scheduler.schedule()
        output = StepOutput()
        if not batch.seqs:
            return output
        seqs, num_new = order_decodes_first(batch.seqs, batch.num_new_tokens)
        batch.seqs, batch.num_new_tokens = seqs, num_new
        counts = logit_counts_for(seqs, num_new)
        logits = self.executor.execute(pack_step(seqs, num_new, self.config.block_size, counts))  # [rows, vocab]
        if any(seq.needs_prompt_logits for seq in seqs):
            self._collect_prompt_logprobs(logits, seqs, num_new, counts)
        rows = self.scheduler.on_step_done(batch)
        self.stats.steps += 1
        self.stats.computed_tokens += sum(num_new)
        self.stats.scheduled_seqs += len(seqs)
        self.stats.last_batch_size = len(seqs)
        self.stats.generated_tokens += len(rows)
        if rows:
            sampled = [seqs[i] for i in rows]
            if len(logits) != len(seqs):  # some chunks got a row per position: find each sequence's last
                last_rows = list(itertools.accumulate(counts))  # each sequence's last row + 1
                rows_of_sampled = [last_rows[i] - 1 for i in rows]
            else:
                rows_of_sampled = rows
            sample_logits = logits if len(rows_of_sampled) == len(logits) else logits[rows_of_sampled]
            tokens = self.sampler(sample_logits, sampled)
            logprobs = self._sampled_logprobs(sample_logits, sampled, tokens)
            sampled_at = time.time()
            for seq, token, logprob in zip(sampled, tokens, logprobs):
                self._on_token(self._requests[seq.request_id], token, output, sampled_at, logprob)
        return output

    @staticmethod
    def _collect_prompt_logprobs(logits, seqs: list[Sequence], num_new: list[int], counts: list[int]) -> None:
        """Append to each sequence's ``prompt_logprobs`` what this step's logits rows give (all in one batch).

        Called before the scheduler records the step, so ``num_computed_tokens`` is still where the chunk starts.
        """
        wanted, queued, first_row = LogprobRequests(), [], 0
        for seq, n, count in zip(seqs, num_new, counts):
            if seq.needs_prompt_logits:
                queued.append((seq, prompt_rows(seq, seq.num_computed_tokens + n - count, first_row, count, wanted)))
            first_row += count
        results = iter(compute_logprobs(logits, wanted))
        for seq, num in queued:
            seq.prompt_logprobs.extend(next(results) for _ in range(num))

    @staticmethod
    def _sampled_logprobs(logits, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        """The sampled tokens' log-probabilities, for the sequences that asked (None for the others)."""
        wanted = LogprobRequests()
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            if seq.sampling.logprobs is not None:
                wanted.add(row, token, seq.sampling.logprobs)
        if not wanted.rows:
            return [None] * len(seqs)
        computed = dict(zip(wanted.rows, compute_logprobs(logits, wanted)))
        return [computed.get(row) for row in range(len(seqs))]

    def shutdown(self) -> None:
        self.executor.shutdown()

    # -- postprocessing ----------------------------------------------------------
    def _on_token(self, request: _Request, token: int, output: StepOutput, sampled_at: float,
                  logprob: TokenLogprob | None) -> None:
        seq = request.seq
        seq.append_token(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        params = seq.sampling
        reason = None
        if (token in self.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = FinishReason.STOP
        elif seq.num_generated_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = FinishReason.LENGTH
        if logprob is not None:
            request.logprobs.append(logprob)
        output.tokens.append(SampledToken(seq.request_id, seq.num_generated_tokens - 1, token, sampled_at,
                                          reason, logprob))
        if reason is not None:
            output.finished.append(self._finish(request, reason))

    def _finish(self, request: _Request, reason: FinishReason) -> FinishedRequest:
        seq = request.seq
        if not seq.is_finished:
            self.scheduler.finish(seq, reason)
        self.sampler.release(seq)
        del self._requests[seq.request_id]
        now = time.monotonic()
        start = seq.first_scheduled_time or now
        return FinishedRequest(
            request_id=seq.request_id, token_ids=seq.generated_token_ids, finish_reason=reason,
            prompt_tokens=seq.num_prompt_tokens, cached_tokens=seq.num_cached_tokens,
            queue_s=start - seq.arrival_time, time_to_first_token_s=(seq.first_token_time or now) - seq.arrival_time,
            total_s=now - seq.arrival_time, logprobs=request.logprobs, prompt_logprobs=seq.prompt_logprobs,
        )
