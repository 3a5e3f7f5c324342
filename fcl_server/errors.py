"""Domain errors of the server; the transport maps each to one gRPC status code."""

from __future__ import annotations


class DomainError(Exception):
    """Base: the message tells the caller what was wrong and what to do."""


class InvalidArgument(DomainError):
    pass


class Unauthenticated(DomainError):
    pass


class PermissionDenied(DomainError):
    pass


class NotFound(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class ResourceExhausted(DomainError):
    pass


class Unavailable(DomainError):
    """The state database cannot be reached now: nothing was written, the call may be retried."""


class Aborted(DomainError):
    """A concurrency or resume conflict: the caller should re-read the state and retry (gRPC ABORTED)."""
