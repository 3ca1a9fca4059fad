"""Named exceptions at tpqueue's user, job and Redis boundaries.

Every message says what was wrong and, where it helps, what to do instead.
"""


class TpqError(Exception):
    """Base class of every error tpqueue raises on purpose."""


class InvalidRequestError(TpqError, ValueError):
    """A generation request that cannot be served as given (bad prompt, limits)."""


class InvalidConfigError(TpqError, ValueError):
    """An engine or deployment setting that cannot work (e.g. a tp that does not divide the heads)."""


class ModelNotFoundError(TpqError, FileNotFoundError):
    """A model name or path that names no usable checkpoint."""


class WorkerGroupError(TpqError, RuntimeError):
    """A rank of a tensor-parallel worker group died, hung or failed to start."""


class QueueFull(TpqError, RuntimeError):
    """A queue holds ``max_queue_depth`` jobs or more: wait, retry later, or raise the limit."""

    def __init__(self, message: str, *, queue_name: str = "", depth: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.queue_name = queue_name
        self.depth = depth
        self.limit = limit
