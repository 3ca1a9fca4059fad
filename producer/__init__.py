"""tpqueue's client side: submit generation jobs to Redis, stream their tokens, read their results.

Never imports torch (nor the worker).
"""
from producer.async_client import AsyncClient
from producer.batches import AsyncBatchHandle, BatchHandle
from producer.client import Client
from producer.handles import AsyncJobHandle, JobHandle
from producer.job_state import JobState, Outcome
from producer.session import Session
from producer.stream import AsyncTokenStream, TokenStream

__all__ = [
    "AsyncBatchHandle",
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncTokenStream",
    "BatchHandle",
    "Client",
    "JobHandle",
    "JobState",
    "Outcome",
    "Session",
    "TokenStream",
]
