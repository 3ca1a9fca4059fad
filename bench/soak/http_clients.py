"""The soak's HTTP clients: session jobs through the gateway replicas, as a client behind a load balancer sees them.

A job goes to ``POST /v1/completions`` on one replica, with its job id as
``Idempotency-Key`` (so every retry names the same job) and its session in
``X-Session-Id``; streamed jobs read the SSE stream and keep each event's
``id:`` (the index of the last token it carries). When the replica goes
away (a ``gateway-kill``: the connection refused, reset or cut mid-body) or
answers with a server error, the client moves to the other replica, as a
load balancer would send it there:

- a stream that has received events resumes with
  ``GET /v1/completions/{id}/stream`` and ``Last-Event-ID``; one that has
  none yet, or whose resume finds no such completion (404: Redis lost it),
  posts the request again;
- a non-streamed request is posted again, and answers once the job ends.

The client records what it received (:class:`HttpAnswer`); the job's
result, read from Redis once the answer is whole, is what
:func:`bench.soak.checks.check_http` holds it against.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from bench.soak.gateways import Gateways

RETRY_PAUSE_S = 0.5
READ_TIMEOUT_S = 30.0  # a stream with no event this long, or an answer this late, is asked again (same job)
TRANSIENT_CODES = {"redis_unavailable", "internal_error", "timeout", "service_unavailable", "no_live_group"}


@dataclass
class HttpAnswer:
    """What one HTTP client received of its job: the text, each stream event, the usage, the failovers."""

    text: str = ""
    events: list[tuple[int, str, float]] = field(default_factory=list)  # text events: id (last token index), text, received
    last_id: int | None = None  # the id of the last event received (of any kind): what a resume sends
    end_id: int | None = None  # the id of the finish event: the index of the job's last token
    finish_reason: str | None = None
    completion_tokens: int | None = None  # the usage the gateway reported
    failovers: int = 0  # times the client moved to the other replica (the one it used failed)
    posts: int = 0  # POSTs of the request (the first included)
    resumes: int = 0  # GET .../stream with Last-Event-ID


class JobEnded(Exception):
    """The job ended without a result: ``state`` (failed, cancelled) and the gateway's message."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


class _Retry(Exception):
    """The replica failed this call (unreachable, cut off, or a server error): try again on the other one."""


class _Gone(Exception):
    """The resume found no such completion (Redis lost it): post the request again."""


class HttpJobs:
    """Runs soak jobs through ``gateways``' replicas; :meth:`run` one to its end or the clock's."""

    def __init__(self, gateways: Gateways, model: str, over) -> None:
        self.gateways, self.model, self.over = gateways, model, over
        self._lock = threading.Lock()
        self.active: dict[str, int] = {}  # job id -> the replica its client talks to now
        self._local = threading.local()

    def _http(self) -> httpx.Client:
        """This thread's HTTP client (one connection pool per client thread)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S))
        return client

    def on_replica(self, replica: int) -> set[str]:
        """The jobs whose clients talk to ``replica`` now."""
        with self._lock:
            return {job_id for job_id, r in self.active.items() if r == replica}

    def run(self, spec, replica: int, posted) -> HttpAnswer | None:
        """``spec`` through the gateway, starting on ``replica``: what its client received; None if the clock ended.

        ``posted()`` is called as the first request goes out (the job counts as submitted).
        :class:`JobEnded` when the gateway says the job failed or was cancelled.
        """
        answer = HttpAnswer()
        posted()
        try:
            while not self.over():
                with self._lock:
                    self.active[spec.job_id] = replica
                try:
                    if spec.stream:
                        self._stream(spec, replica, answer)
                    else:
                        self._complete(spec, replica, answer)
                    return answer
                except (_Retry, _Gone):
                    answer.failovers += 1
                    replica = (replica + 1) % len(self.gateways.ports)
                    time.sleep(RETRY_PAUSE_S)
            return None
        finally:
            with self._lock:
                self.active.pop(spec.job_id, None)

    # -- one call

    def _body(self, spec, stream: bool) -> dict:
        body = {"model": self.model, "prompt": spec.prompt, "stream": stream, **spec.sampling}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _headers(self, spec) -> dict[str, str]:
        return {"Idempotency-Key": spec.job_id, "X-Session-Id": spec.session_id}

    def _complete(self, spec, replica: int, answer: HttpAnswer) -> None:
        answer.posts += 1
        try:
            response = self._http().post(f"{self.gateways.url(replica)}/v1/completions", json=self._body(spec, False),
                                         headers=self._headers(spec))
        except httpx.HTTPError as exc:
            raise _Retry(repr(exc)) from None
        body = _json_or_retry(response)
        choice = body["choices"][0]
        answer.text, answer.finish_reason = choice["text"], choice["finish_reason"]
        answer.completion_tokens = body["usage"]["completion_tokens"]

    def _stream(self, spec, replica: int, answer: HttpAnswer) -> None:
        base = self.gateways.url(replica)
        if answer.last_id is not None:
            answer.resumes += 1
            request = self._http().build_request(
                "GET", f"{base}/v1/completions/{spec.job_id}/stream", headers={"Last-Event-ID": str(answer.last_id)})
        else:
            answer.posts += 1
            request = self._http().build_request("POST", f"{base}/v1/completions", json=self._body(spec, True),
                                                 headers=self._headers(spec))
        try:
            response = self._http().send(request, stream=True)
            try:
                if response.status_code == 404 and answer.last_id is not None:
                    raise _Gone()
                if response.status_code != 200:
                    response.read()
                    _json_or_retry(response)
                self._read_events(response, answer)
            finally:
                response.close()
        except _Gone:
            answer.events.clear()  # the job runs again from its start: so does what this client shows
            answer.text, answer.last_id, answer.end_id = "", None, None
            raise _Retry("the completion is gone") from None
        except httpx.HTTPError as exc:
            raise _Retry(repr(exc)) from None

    def _read_events(self, response: httpx.Response, answer: HttpAnswer) -> None:
        """The stream's events into ``answer`` until ``[DONE]``; :class:`_Retry` if it ends before."""
        event_id, data = None, None
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = int(line[4:])
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data is not None:  # the blank line that ends an event
                if data == "[DONE]":
                    return
                self._take(json.loads(data), event_id, answer)
                event_id, data = None, None
        raise _Retry("the stream ended before [DONE]")

    @staticmethod
    def _take(chunk: dict, event_id: int | None, answer: HttpAnswer) -> None:
        """One stream chunk (the event ``event_id``) into ``answer``."""
        if "error" in chunk:
            _raise_error(chunk["error"], status=None)
        if chunk.get("usage"):
            answer.completion_tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if choice.get("text"):
                answer.events.append((event_id, choice["text"], time.time()))
                answer.text += choice["text"]
            if choice.get("finish_reason"):
                answer.finish_reason, answer.end_id = choice["finish_reason"], event_id
        if event_id is not None:
            answer.last_id = event_id


def _json_or_retry(response: httpx.Response) -> dict:
    """The body of a 200; :class:`_Retry` for what a retry may cure, :class:`JobEnded` for the job's end."""
    try:
        body = response.json()
    except ValueError:
        raise _Retry(f"HTTP {response.status_code} without JSON") from None
    if response.status_code == 200:
        return body
    _raise_error(body.get("error") or {}, status=response.status_code)
    raise AssertionError("unreachable")


def _raise_error(error: dict, status: int | None) -> None:
    """The exception for an error answer (or a stream's error event, ``status`` None)."""
    code, message = error.get("code"), error.get("message", "")
    if code == "job_failed" or code == "request_refused_by_model":
        raise JobEnded("failed", message)
    if code == "cancelled":
        raise JobEnded("cancelled", message)
    if status == 404 and error.get("param") == "model":  # no live group serves the model right now
        raise _Retry(f"{status} {code}: {message}")
    if code == "not_found" or status == 404:  # also a stream's error event: Redis lost the job while it ran
        raise _Gone()
    if code in TRANSIENT_CODES or code == "queue_full" or (status is not None and status >= 500):
        raise _Retry(f"{status} {code}: {message}")
    raise JobEnded("failed", f"HTTP {status} {code}: {message}")
