"""The bridge's error tree, grouped by what the caller does next.

::

    BridgeError
    ├── ConfigError        stop at start, exit 78 (EX_CONFIG) so systemd does not restart-loop
    ├── Retryable          network error, timeout, 429, 5xx: back off (retry_after is a floor)
    ├── Rejected           this record is bad (400/422, mapping failure): dead-letter, carry on
    │   └── AlreadyExists  a create hit an existing object (GHL conversation): look it up instead
    ├── InDoubt            a write's outcome is unknown: reconcile before any retry
    └── Fatal              the system cannot go on: stop with a clear message, non-zero exit
        └── AuthError      revoked or invalid credentials, missing scope, wrong location
            ├── MissingScope   the token may not make this call: grant the scope
            └── TokenExpired   an access token expired or is invalid: a refresh may fix it

Messages must never carry a secret: they are logged and shown to operators. Build them
from status codes, field names and reasons, not from response bodies that may echo a key.
"""

from __future__ import annotations

EX_CONFIG = 78
EX_USAGE = 2


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is unusable; ``path`` is the ``$.key.path`` of the bad value."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class Retryable(BridgeError):
    """A transient failure: try again later, no sooner than ``retry_after`` seconds.

    ``status`` is the HTTP status when there was one (None for network errors).
    """

    def __init__(
        self, message: str, retry_after: float | None = None, *, status: int | None = None
    ) -> None:
        self.retry_after = retry_after
        self.status = status
        super().__init__(message)


class Rejected(BridgeError):
    """The record itself is bad; retrying will not help. ``details`` lists reasons.

    ``status`` is the HTTP status when an API refused it (404 reads as "not found").
    """

    def __init__(
        self, message: str, details: tuple[str, ...] = (), *, status: int | None = None
    ) -> None:
        self.details = details
        self.status = status
        super().__init__(message)


class AlreadyExists(Rejected):
    """A create hit an object that already exists (GHL conversation create); look it up instead."""


class InDoubt(BridgeError):
    """A write may or may not have happened (timeout after sending): reconcile first."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class Fatal(BridgeError):
    """The bridge cannot go on for this tenant; an operator has to act."""


class AuthError(Fatal):
    """Credentials are revoked, invalid, lack a scope, or point at the wrong location."""


class MissingScope(AuthError):
    """The token works but may not make this call (GHL 401 "not authorized for this scope")."""


class TokenExpired(AuthError):
    """An access token expired or is invalid; a refresh may fix it."""
