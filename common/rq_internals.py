"""Every place tpqueue relies on rq's private internals (rq 2.12, pinned in pyproject.toml).

rq's public API covers one job per worker; tpqueue's worker runs many at once,
its supervisor requeues a dead worker's jobs before their TTL runs out, and
its client reads results without rq's per-entry serializer lookup. What that
needs of rq's internals lives here, each item named where it is used, and
``tests/unit/test_rq_internals.py`` pins the rq version and each reliance
against rq itself, so an rq upgrade fails there first.
"""
from __future__ import annotations

# ------------------------------------------------------------------ the worker's execution slot and job results

# ------------------------------------------------------------------ rq's Redis layout of queues and registries

# ------------------------------------------------------------------ failure writes

# ------------------------------------------------------------------ result encoding (read by the client)
