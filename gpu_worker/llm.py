"""``Engine``: offline generation on a worker group, like vLLM's ``LLM`` class.

    from gpu_worker import Engine
    from common.sampling import SamplingParams

    with Engine("smollm2-135m-instruct", tp=1) as engine:
        [result] = engine.generate([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0))
        print(result.text, result.finish_reason, result.usage)
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence as SequenceABC
from typing import Union

from common.errors import InvalidRequestError
from common.results import ChatMessage, FinishReason, GenerationResult, TokenEvent
from common.sampling import SamplingParams
from gpu_worker.engine.engine_config import DEFAULT_MODEL, EngineConfig
from gpu_worker.engine.llm_engine import LLMEngine
from gpu_worker.engine.sequence import Priority
from gpu_worker.engine.text_stage import TextOutput, TextStage

Chat = SequenceABC[Union[ChatMessage, Mapping]]
TokensPrompt = Mapping  # {"prompt_token_ids": [int, ...]}
Prompt = Union[str, Chat, TokensPrompt]
SamplingLike = Union[SamplingParams, Mapping, None]


class Engine:
    """A tensor-parallel engine in this process (rank 0) plus ``tp - 1`` child ranks.

    ``prompts`` may be one prompt or a list. A prompt is a string (tokenized
    as is), a chat (a list of ``{"role", "content"}`` messages, rendered with
    the model's chat template), or ``{"prompt_token_ids": [...]}``.
    ``sampling`` is one ``SamplingParams`` (or dict) for all prompts, or a
    list with one per prompt. Bad input raises before anything runs.
    ``SamplingParams(logprobs=k, prompt_logprobs=k)`` adds the model's raw
    log-probabilities to the events and results (see ``common.sampling``).

    With tp > 1 the ranks are spawned processes: call this from code under
    ``if __name__ == "__main__":``.
    """

    def __init__(self, model: str = DEFAULT_MODEL, tp: int = 1, dtype: str = "float32", **options):
        self.config = EngineConfig(model=model, tp=tp, dtype=dtype, **options)
        self.llm = LLMEngine(self.config)
        self.tokenizer = self.llm.tokenizer
        self.texts = TextStage(self.tokenizer, self.llm.eos_token_ids)
        self._ids = itertools.count()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the child ranks. The engine cannot be used afterwards."""
        self.llm.shutdown()

    def generate(self, prompts: Prompt | list[Prompt], sampling: SamplingLike | list[SamplingLike] = None,
                 priority: Priority = Priority.INTERACTIVE) -> list[GenerationResult]:
        """Run every prompt to completion; results come back in the prompts' order."""
        request_ids = self._add(prompts, sampling, priority)
        results: dict[str, GenerationResult] = {}
        for _, finished in self._run(request_ids):
            results.update((r.request_id, r) for r in finished)
        return [results[r] for r in request_ids]

    def stream(self, prompts: Prompt | list[Prompt], sampling: SamplingLike | list[SamplingLike] = None,
               priority: Priority = Priority.INTERACTIVE) -> Iterator[TokenEvent]:
        """Yield each token event as soon as it is sampled; ``request_id`` is the prompt's position."""
        request_ids = self._add(prompts, sampling, priority)
        names = {r: str(i) for i, r in enumerate(request_ids)}
        for events, _ in self._run(request_ids):
            for event in events:
                yield event.model_copy(update={"request_id": names[event.request_id]})

    # -- internals -------------------------------------------------------------
    def _run(self, request_ids: list[str]):
        pending = set(request_ids)
        try:
            while pending:
                text = self._step()
                yield text.events, text.finished
                pending.difference_update(r.request_id for r in text.finished)
        finally:
            for request_id in pending:  # an error or an abandoned stream: free their cache blocks
                self.llm.abort(request_id)
                self.texts.discard(request_id)

    def _step(self) -> TextOutput:
        """One engine step and its text; a request whose stop string appeared stops before the next step."""
        output = self.llm.step()
        text = self.texts.process(output.tokens, output.finished)
        stopped = [self.llm.abort(request_id, FinishReason.STOP) for request_id in text.stops]
        text.finished += self.texts.process([], [done for done in stopped if done is not None]).finished
        return text

    def _add(self, prompts, sampling, priority) -> list[str]:
        prompt_list = self._as_prompt_list(prompts)
        samplings = self._as_sampling_list(sampling, len(prompt_list))
        token_ids = [self._tokenize(p) for p in prompt_list]
        for ids in token_ids:
            self.llm.validate_prompt(ids)
        request_ids = [f"offline-{next(self._ids)}" for _ in token_ids]
        for request_id, ids, params in zip(request_ids, token_ids, samplings):
            self.llm.add_request(request_id, ids, params, priority)
            self.texts.add(request_id, ids, params)
        return request_ids

    @staticmethod
    def _as_prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, (str, Mapping)):
            return [prompts]
        if isinstance(prompts, SequenceABC) and prompts:
            return [prompts] if _is_chat_message(prompts[0]) else list(prompts)
        raise InvalidRequestError("prompts must be a string, a chat (list of messages), "
                                  "{'prompt_token_ids': [...]}, or a non-empty list of those")

    @staticmethod
    def _as_sampling_list(sampling, count: int) -> list[SamplingParams]:
        def one(s) -> SamplingParams:
            if s is None:
                return SamplingParams()
            return s if isinstance(s, SamplingParams) else SamplingParams(**s)

        if isinstance(sampling, list):
            if len(sampling) != count:
                raise InvalidRequestError(f"got {len(sampling)} sampling parameter sets for {count} prompts")
            return [one(s) for s in sampling]
        return [one(sampling)] * count

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty; give at least one token of text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, Mapping):
            if set(prompt) != {"prompt_token_ids"}:
                raise InvalidRequestError("a token prompt is {'prompt_token_ids': [int, ...]} and nothing else")
            return list(prompt["prompt_token_ids"])
        if isinstance(prompt, SequenceABC) and prompt:
            return self.tokenizer.encode_chat(list(prompt))
        raise InvalidRequestError(f"cannot read a prompt from {type(prompt).__name__}; "
                                  "give a string, a chat, or {'prompt_token_ids': [...]}")


def _is_chat_message(item) -> bool:
    return isinstance(item, ChatMessage) or (isinstance(item, Mapping) and "role" in item)
