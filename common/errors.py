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


REFUSED = "the model cannot run this request: "
"""How a worker's failure message begins when the request itself is at fault (a retry would fail alike)."""


def refusal(why: str) -> str:
    """The failure message of a job its worker refused for what the request asks (see :attr:`JobFailed.refused`)."""
    return REFUSED + why


class JobFailed(TpqError, RuntimeError):
    """A job ended FAILED, or its token stream ended with an error: ``error`` holds the worker's message."""

    def __init__(self, message: str, *, job_id: str = "", error: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.error = error

    @property
    def refused(self) -> bool:
        """Whether the worker refused the request for what it asks (too long a prompt for the model's
        context, a prompt that encodes to nothing): the client's fault, not the worker's."""
        return REFUSED in self.error or REFUSED in str(self)


class JobCancelled(TpqError, RuntimeError):
    """A job was cancelled before any worker started it, so it has no result."""

    def __init__(self, message: str, *, job_id: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFound(TpqError, LookupError):
    """No such job in Redis: never submitted, or its result and token log expired (TPQ_RESULT_TTL_S)."""

    def __init__(self, message: str, *, job_id: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id


class ResultTimeout(TpqError, TimeoutError):
    """Waiting for a job's result, or for the next event of its token stream, took longer than asked."""

    def __init__(self, message: str, *, job_id: str = "", status: str = "", waited_s: float = 0.0) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status
        self.waited_s = waited_s


class StreamIncomplete(TpqError, RuntimeError):
    """A job finished but its token log has no end record: it expired or was trimmed; use the result instead."""

    def __init__(self, message: str, *, job_id: str = "", received: int = 0) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.received = received
