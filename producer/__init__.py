"""tpqueue's client side: submit generation jobs to Redis, stream their tokens, read their results.

Never imports torch (nor the worker).
"""
from producer.async_client import AsyncBatchHandle, AsyncClient, AsyncJobHandle
from producer.client import BatchHandle, Client, JobHandle, Outcome
from producer.session import Session
from producer.stream import AsyncTokenStream, JobState, TokenStream

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
