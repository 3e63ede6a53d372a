"""Errors the services raise on purpose; the gRPC edge maps each to its status code.

Kept free of gRPC so the algorithm modules can raise them; ``specdec.rpc.status`` does the mapping.
"""

from __future__ import annotations


class SpecdecError(Exception):
    """Base class; the edge turns unknown exceptions into INTERNAL."""


class InvalidRequest(SpecdecError, ValueError):
    """Bad input (INVALID_ARGUMENT). The message names the field."""


class Overloaded(SpecdecError):
    """A queue or cache is full (RESOURCE_EXHAUSTED); ``retry_after_s``, when known: how long to
    wait before trying again (HTTP ``Retry-After``, gRPC ``grpc-retry-pushback-ms``)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReady(SpecdecError):
    """A dependency is missing or mismatched (FAILED_PRECONDITION)."""


class SessionLost(SpecdecError):
    """A call sent only the tokens its session lacked, and the session no longer holds the rest (a
    restart, an eviction, another replica): NOT_FOUND, and the caller sends the whole context."""


class Unavailable(SpecdecError):
    """A transient fault worth retrying (UNAVAILABLE)."""


class DeadlineExceeded(SpecdecError):
    """The request's deadline passed before it finished (DEADLINE_EXCEEDED)."""


class Cancelled(SpecdecError):
    """The client went away; the work was stopped (CANCELLED)."""


def check_token_ids(field: str, token_ids, vocab_size: int, *, allow_empty: bool = False, max_len: int = 0) -> list[int]:
    """``token_ids`` (a repeated field, or any sequence) as a list, once its size is within
    ``max_len`` (0: any) and every id is in the vocabulary. The size is checked before anything
    is copied; min and max run in C, and the loop that names the first bad id runs only when there is one."""
    if max_len and len(token_ids) > max_len:
        raise InvalidRequest(f"{field} has {len(token_ids)} tokens; the most accepted is {max_len}")
    if not len(token_ids) and not allow_empty:
        raise InvalidRequest(f"{field} is empty")
    if len(token_ids) and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        i, token = next((i, t) for i, t in enumerate(token_ids) if not 0 <= t < vocab_size)
        raise InvalidRequest(f"{field}[{i}] = {token} is outside the vocabulary [0, {vocab_size})")
    return list(token_ids)


def check_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidRequest(f"{field} = {value} is out of range [{low}, {high}]")
    return value
