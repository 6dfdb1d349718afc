"""The exception root of the server. Each class carries its HTTP status and error category.

The API layer maps these to JSON responses in one place; a job that raises one ends `failed`
with the class's category. Any other exception is a server fault (category `server`).
"""

from __future__ import annotations


class TrainpulseError(Exception):
    """Root of every error the server raises on purpose."""

    status = 500
    category = "server"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class UserError(TrainpulseError, ValueError):
    """The request is invalid: a bad field value, an unsupported option, a token out of range."""

    status = 400
    category = "user"


class NotFoundError(TrainpulseError, LookupError):
    """The named model, session, job, checkpoint or sampler does not exist."""

    status = 404
    category = "user"


class ConflictError(TrainpulseError):
    """The request conflicts with the current state (for example a model that is unloaded)."""

    status = 409
    category = "user"


class GoneError(TrainpulseError):
    """The model's adapter is gone for good (unloaded, failed to create, or lost in a restart).

    410 rather than 409, because the tinker SDK retries a 409 without end.
    """

    status = 410
    category = "user"


class QueueFullError(TrainpulseError):
    """Too many jobs are queued; the client should retry after `retry_after_s`."""

    status = 429
    category = "server"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class JobCancelledError(TrainpulseError):
    """Raised inside a running job at a progress boundary once cancellation was requested."""

    status = 200
    category = "user"
