"""tpqueue's OpenAI-compatible HTTP gateway: OpenAI's chat and completions API over tpqueue's jobs.

A request becomes the same :class:`~common.schemas.GenerationRequest` the
Python client submits (through :class:`producer.AsyncClient`); answers and
server-sent-event streams are OpenAI's shapes. Stateless: everything it
knows is in Redis, so replicas scale out behind a load balancer. Never
imports torch. ``create_app`` builds the FastAPI app; ``tpq gateway`` runs it.
"""
from producer.gateway.app import create_app

__all__ = ["create_app"]
