"""tpqueue's client side: submit generation jobs to Redis, stream their tokens, read their results.

Never imports torch (nor the worker).
"""
from producer.client import BatchHandle, Client, JobHandle, Outcome
from producer.stream import AsyncTokenStream, JobState, TokenStream

__all__ = ["AsyncTokenStream", "BatchHandle", "Client", "JobHandle", "JobState", "Outcome", "TokenStream"]
