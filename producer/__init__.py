"""tpqueue's client side: submit generation jobs to Redis (never imports torch)."""
from producer.client import BatchHandle, Client, JobHandle

__all__ = ["BatchHandle", "Client", "JobHandle"]
