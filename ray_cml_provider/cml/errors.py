"""Typed errors for the CML API v2 client.

Every HTTP error carries the method, the path and the server's own ``message`` so that a
user reading one line knows which call failed and why. The API key is never part of an
error: the client redacts it from anything the server echoes back.
"""

from __future__ import annotations


class CMLError(Exception):
    """Base class of every error this client raises."""


class CMLConfigurationError(CMLError):
    """A setting (host, project, API key) is missing or malformed; no request was sent."""


class CMLAPIError(CMLError):
    """The server answered a request with an error status."""

    def __init__(self, method: str, path: str, status: int, message: str, code: int | None = None):
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        self.code = code
        super().__init__(f"{method} {path} failed with HTTP {status}: {message}")


class CMLInvalidRequestError(CMLAPIError):
    """400/409/422: the request is wrong and retrying it unchanged will not help."""


class CMLAuthenticationError(CMLAPIError):
    """401: the API key is missing, wrong or expired."""


class CMLPermissionError(CMLAPIError):
    """403: the key is valid but may not do this (e.g. not a project collaborator)."""


class CMLNotFoundError(CMLAPIError):
    """404: the project, application or file does not exist."""


class CMLRateLimitedError(CMLAPIError):
    """429 after every retry was spent."""


class CMLServerError(CMLAPIError):
    """5xx after every retry was spent (or a 5xx that is never retried, like 500)."""


class CMLConnectionError(CMLError):
    """The server could not be reached (refused, reset, timed out) after every retry."""

    def __init__(self, method: str, path: str, reason: str):
        self.method = method
        self.path = path
        self.reason = reason
        super().__init__(f"{method} {path} could not reach the CML API: {reason}")


# Failures that may pass by themselves (CML busy or unreachable): worth asking again later,
# after the transport's own retries gave up.
TRANSIENT_ERRORS = (CMLServerError, CMLRateLimitedError, CMLConnectionError)


class CMLOutcomeUnknownError(CMLError):
    """A non-idempotent request (create, upload) may or may not have taken effect.

    The request was sent but its answer was lost (read timeout, connection reset, 502/504
    from a gateway). Retrying blindly could create a second application, so the client
    stops and says so; ``CMLClient.create_application_once`` checks by name and resumes.
    """

    def __init__(self, method: str, path: str, reason: str, name: str | None = None):
        self.method = method
        self.path = path
        self.reason = reason
        self.name = name
        what = f" ({name!r})" if name else ""
        super().__init__(
            f"{method} {path}{what}: the answer was lost ({reason}); the request may have "
            "taken effect. Look it up by name before sending it again."
        )


_BY_STATUS: dict[int, type[CMLAPIError]] = {
    400: CMLInvalidRequestError,
    401: CMLAuthenticationError,
    403: CMLPermissionError,
    404: CMLNotFoundError,
    409: CMLInvalidRequestError,
    422: CMLInvalidRequestError,
    429: CMLRateLimitedError,
}


def error_class_for_status(status: int) -> type[CMLAPIError]:
    """Map an HTTP status to the error class the client raises for it."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status >= 500:
        return CMLServerError
    return CMLInvalidRequestError if 400 <= status < 500 else CMLAPIError
