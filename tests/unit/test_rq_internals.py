"""rq's internals that tpqueue relies on (common/rq_internals.py), pinned against rq itself."""
from __future__ import annotations

# ------------------------------------------------------------------ the worker's execution slot and job results

# ------------------------------------------------------------------ rq's Redis layout of queues and registries

# ------------------------------------------------------------------ failure writes

# ------------------------------------------------------------------ result encoding (read by the client)
