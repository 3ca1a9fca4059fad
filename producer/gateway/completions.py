"""Serving completions: an OpenAI request becomes tpqueue jobs, and their results or streams its answer.

:class:`Completions` holds what the routes share (the :class:`AsyncClient`,
a synchronous connection for the groups' registrations, the settings, the
background tasks) and does the work of each route; :mod:`producer.gateway.app`
only binds it to HTTP. Every job is built by the client
(:meth:`producer.AsyncClient.build_request`), so the gateway's requests are
checked and limited exactly as the Python client's are, and all of a
completion's jobs are enqueued in one transaction (``submit_batch``): a full
queue refuses all of them.

Logprobs, echoed token-id prompts and token-id prompts themselves need the
model's vocabulary (:mod:`producer.gateway.vocab`, which the groups
publish): a completion that needs it and finds none is refused with a 503
before anything is enqueued, and token ids past it with a 400.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import redis

from common.errors import ResultTimeout
from common.schemas import GenerationRequest
from common.settings import Settings
from producer.async_client import AsyncClient
from producer.gateway import records
from producer.gateway.deployment import Deployment, read_deployment
from producer.gateway.errors import APIError, bad_request, not_found
from producer.gateway.logprobs import echo_texts
from producer.gateway.params import Completion, Kind
from producer.gateway.records import CompletionRecord
from producer.gateway.responses import completion_response
from producer.gateway.streaming import CompletionStream, echoes_sent, resume_points
from producer.gateway.vocab import Vocabulary, VocabularyCache, prompt_ids_refusal
from producer.handles import AsyncJobHandle

log = logging.getLogger(__name__)

DEPLOYMENT_TTL_S = 1.0
"""Seconds a reading of the groups serves later requests (reading heartbeats SCANs the keyspace)."""
FINISHED_PROBE_S = 0.05
"""Seconds ``GET .../{id}`` waits for results that are not there yet before it answers 409."""


class Completions:
    """The gateway's state (none of it about requests: that lives in Redis) and its completion logic."""

    def __init__(self, client: AsyncClient, conn: redis.Redis, settings: Settings) -> None:
        self.client, self.conn, self.settings = client, conn, settings
        self._background: set[asyncio.Task] = set()
        self._deployment: tuple[float, Deployment] | None = None
        self.vocabs = VocabularyCache()

    async def aclose(self) -> None:
        """Close the connections; a pending disconnect-grace cancel is dropped (its jobs run to their end)."""
        for task in self._background:
            task.cancel()
        await self.client.aclose()  # conn is the client's own (its synchronous pool)

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` in the background, beyond the request that started it."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def deployment(self) -> Deployment:
        """The groups and their verdicts, read at most :data:`DEPLOYMENT_TTL_S` ago."""
        now = time.monotonic()
        if self._deployment is None or now - self._deployment[0] >= DEPLOYMENT_TTL_S:
            self._deployment = (now, await self.client.run_sync(read_deployment, self.conn, self.settings))
        return self._deployment[1]

    async def check_model(self, model: str) -> None:
        """Raise 503 when no group serves, 404 when none serves ``model``."""
        deployment = await self.deployment()
        reason = deployment.unavailable_reason()
        if reason is not None:
            raise APIError(503, reason, code="no_live_group")
        if model not in deployment.models:
            served = ", ".join(sorted(deployment.models))
            raise not_found(f"the model {model!r} is not served here; served: {served} (GET /v1/models)",
                            param="model")

    # ------------------------------------------------------------ creating

    async def create(self, completion: Completion, *, session_header: str | None,
                     idempotency_key: str | None) -> tuple[CompletionRecord, list[AsyncJobHandle]]:
        """Check, record and enqueue ``completion``'s jobs; its record and job handles."""
        await self.check_model(completion.model)
        token_prompts = completion.token_prompts
        if completion.logprobs is not None or token_prompts:
            refusal = prompt_ids_refusal(await self.vocabulary(completion.model), token_prompts)
            if refusal is not None:
                raise bad_request(refusal, param="prompt")
        cid = records.completion_id(completion.kind, idempotency_key, completion.request_id)
        record = records.record_of(completion, cid, records.now_s())
        requests = [self._build(completion, choice, job_id, session_header or completion.session_id)
                    for choice, job_id in enumerate(record.job_ids)]
        stored = await records.save(self.client.redis, record, self.settings.result_ttl_s)
        if (stored.kind, stored.num_jobs, stored.n) != (record.kind, record.num_jobs, record.n):
            raise APIError(409, f"completion {cid!r} exists with other parameters; a retry must repeat its request "
                                "(use a new Idempotency-Key or request_id)", code="idempotency_conflict",
                           type_="conflict_error")
        batch = await self.client.submit_batch(requests)
        return stored, list(batch.handles)

    def _build(self, completion: Completion, choice: int, job_id: str, session_id: str | None) -> Any:
        return self.client.build_request(**completion.job_fields(choice), session_id=session_id, request_id=job_id,
                                         priority=completion.priority)

    async def vocabulary(self, model: str) -> Vocabulary:
        """``model``'s vocabulary (read once, then cached); 503 when no group of it published one."""
        vocab = await self.vocabs.get(self.client.redis, model)
        if vocab is None:
            raise APIError(503, f"no vocabulary of {model} is published (its worker groups predate logprobs in the "
                                "gateway: restart them); logprobs and token-id prompts need it",
                           code="vocabulary_unavailable")
        return vocab

    async def rendering(self, record: CompletionRecord, requests: list[GenerationRequest | None]
                        ) -> tuple[Vocabulary | None, list[str] | None]:
        """What rendering ``record`` (its jobs' ``requests``) needs: ``(vocab, echoes)``, the keyword arguments
        of :func:`~producer.gateway.responses.completion_response` (the vocabulary is read only when needed)."""
        token_prompts = record.echo and any(r is not None and r.prompt_token_ids is not None for r in requests)
        vocab = await self.vocabulary(record.model) if record.logprobs is not None or token_prompts else None
        return vocab, (echo_texts(requests, vocab) if record.echo else None)

    async def answer(self, record: CompletionRecord, handles: list[AsyncJobHandle]) -> dict[str, Any]:
        """The whole answer, once every job finished."""
        vocab, echoes = await self.rendering(record, [h.request for h in handles])
        results = await asyncio.gather(*(h.result() for h in handles))
        return completion_response(record, list(results), vocab=vocab, echoes=echoes)

    def stream(self, record: CompletionRecord, handles: list[AsyncJobHandle], starts: list[int], *,
               echoed: list[bool] | None = None) -> CompletionStream:
        """The SSE stream of ``handles`` from ``starts`` (``echoed``: whose echo was sent; default none).

        A completion that needs its model's vocabulary has it read already (:meth:`create`, :meth:`resume`).
        """
        vocab = self.vocabs.peek(record.model)
        echoes = echo_texts([h.request for h in handles], vocab) if record.echo else None
        return CompletionStream(self.client, record, handles, starts,
                                grace_s=self.settings.http_disconnect_grace_s, spawn=self.spawn, vocab=vocab,
                                echoes=echoes, echoed=echoed)

    # ------------------------------------------------------------ existing completions

    async def existing(self, kind: Kind, cid: str) -> tuple[CompletionRecord, list[AsyncJobHandle]]:
        """The record and job handles of completion ``cid`` of this ``kind``; 404 if there is none."""
        record = await records.load(self.client.redis, cid)
        if record is None or record.kind != kind:
            raise not_found(f"no {'chat ' if kind == 'chat' else ''}completion {cid!r} (never created here, or "
                            "expired: TPQ_RESULT_TTL_S)", param="id")
        handles = [await self.client.job(job_id) for job_id in record.job_ids]
        return record, handles

    async def finished(self, kind: Kind, cid: str) -> dict[str, Any]:
        """The answer of a completion whose jobs all finished; 409 while one still runs."""
        record, handles = await self.existing(kind, cid)
        try:
            results = await asyncio.gather(*(h.result(timeout=FINISHED_PROBE_S) for h in handles))
        except ResultTimeout:
            raise APIError(409, f"completion {cid!r} has not finished yet; stream it (GET .../{cid}/stream) or "
                                "ask again later", code="not_finished", type_="conflict_error") from None
        vocab, echoes = await self.rendering(record, [h.request for h in handles])
        return completion_response(record, list(results), vocab=vocab, echoes=echoes)

    async def resume(self, kind: Kind, cid: str, last_event_id: str | None) -> CompletionStream:
        """The stream of completion ``cid`` after the event ``last_event_id`` (None: from the start)."""
        record, handles = await self.existing(kind, cid)
        starts = resume_points(last_event_id, record.num_jobs)
        await self.rendering(record, [h.request for h in handles])  # reads the vocabulary the stream needs, if any
        return self.stream(record, handles, starts, echoed=echoes_sent(last_event_id, record.num_jobs))

