"""HTTP transport for CML API v2: authentication, timeouts, retries and error mapping.

Retries follow one rule: retry what cannot do harm twice. GET, PATCH, DELETE and the colon
verbs are idempotent and are retried on 429, 502, 503, 504, time-outs and dropped
connections. A create or an upload is retried only when the server surely did nothing
(429/503, or a connection that was never opened); when its answer is lost after it was sent,
``CMLOutcomeUnknownError`` tells the caller to look the object up before trying again.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from ray_cml_provider.cml.errors import (
    CMLConnectionError,
    CMLOutcomeUnknownError,
    CMLServerError,
    error_class_for_status,
)
from ray_cml_provider.cml.settings import CMLSettings
from ray_cml_provider.version import __version__

logger = logging.getLogger("ray_cml_provider.cml")

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
# Answers a server gives before doing any work: safe to retry even a create.
REFUSED_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; ``Retry-After`` wins when the server sends it."""

    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 20.0

    def delay_s(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after_s is not None:
            return min(self.backoff_cap_s, max(0.0, retry_after_s))
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** (attempt - 1))
        # "Equal jitter": never less than half the ceiling, so waits still grow.
        return rng.uniform(ceiling / 2, ceiling)


class Transport:
    """Sends one logical request, retrying as the policy allows, and decodes the answer."""

    def __init__(
        self,
        settings: CMLSettings,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.timeout = (connect_timeout_s, timeout_s)
        self.retry = retry or RetryPolicy()
        self._session = session or requests.Session()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._headers = {
            "Authorization": f"Bearer {settings.api_key.reveal()}",
            "Accept": "application/json",
            "User-Agent": f"ray-cml-provider/{__version__}",
        }

    def __repr__(self) -> str:
        return f"Transport(host={self.settings.host!r})"

    def close(self) -> None:
        self._session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        files: dict[str, Any] | None = None,
        idempotent: bool = True,
        raw: bool = False,
        gone_after_retry_is_success: bool = False,
        name_hint: str | None = None,
    ) -> Any:
        """Send ``method path``; return decoded JSON (``{}`` when empty), or bytes if ``raw``.

        ``gone_after_retry_is_success`` is for deletes: a 404 on a retry means an earlier
        attempt whose answer was lost did the job.
        """
        url = self.settings.host + path
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                response = self._session.request(
                    method,
                    url,
                    params=params,
                    json=json_body,
                    files=files,
                    headers=self._headers,
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                reason = self.redact(_describe_exception(exc))
                never_sent = _never_reached_server(exc)
                if not idempotent and not never_sent:
                    raise CMLOutcomeUnknownError(method, path, reason, name=name_hint) from None
                if attempt >= self.retry.max_attempts:
                    raise CMLConnectionError(method, path, reason) from None
                self._wait_before_retry(method, path, attempt, reason, None)
                continue

            elapsed_ms = (time.monotonic() - started) * 1000
            status = response.status_code
            logger.debug("%s %s -> %d in %.0f ms", method, path, status, elapsed_ms)
            if status < 400:
                if raw:
                    return response.content
                return _decode_json(response)
            if status == 404 and gone_after_retry_is_success and attempt > 1:
                return {}
            message, code = self._error_message(response)
            if status in RETRYABLE_STATUSES:
                if not idempotent and status not in REFUSED_STATUSES:
                    reason = f"HTTP {status}: {message}"
                    raise CMLOutcomeUnknownError(method, path, reason, name=name_hint)
                if attempt < self.retry.max_attempts:
                    self._wait_before_retry(
                        method, path, attempt, f"HTTP {status}: {message}", _retry_after_s(response)
                    )
                    continue
            raise error_class_for_status(status)(method, path, status, message, code)

    def redact(self, text: str) -> str:
        """Remove the API key from text that came from elsewhere (server messages, errors)."""
        key = self.settings.api_key.reveal()
        return text.replace(key, "***") if key else text

    def _wait_before_retry(
        self, method: str, path: str, attempt: int, reason: str, retry_after_s: float | None
    ) -> None:
        delay = self.retry.delay_s(attempt, retry_after_s, self._rng)
        logger.warning(
            "%s %s: %s; retrying in %.1f s (attempt %d of %d)",
            method,
            path,
            reason,
            delay,
            attempt + 1,
            self.retry.max_attempts,
        )
        self._sleep(delay)

    def _error_message(self, response: requests.Response) -> tuple[str, int | None]:
        code = None
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            message = body.get("message") or body.get("error") or ""
            code = body.get("code") if isinstance(body.get("code"), int) else None
        else:
            message = response.text.strip()[:500]
        return self.redact(message or response.reason or "no message"), code


def _decode_json(response: requests.Response) -> Any:
    if not response.content:
        return {}
    try:
        return response.json()
    except ValueError as exc:
        raise CMLServerError(
            response.request.method or "?",
            _path_of(response.request.url or ""),
            response.status_code,
            f"answer is not JSON: {exc}",
        ) from None


def _path_of(url: str) -> str:
    return requests.utils.urlparse(url).path


def _retry_after_s(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    if parsed is None:
        return None
    return max(0.0, parsed.timestamp() - time.time())


def _never_reached_server(exc: requests.RequestException) -> bool:
    """True when the connection was never opened, so the server cannot have acted."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (NewConnectionError, ConnectTimeoutError)):
            return True
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            current = reason
            continue
        nested = (
            current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        )
        current = nested or current.__cause__ or current.__context__
    return False


def _describe_exception(exc: requests.RequestException) -> str:
    kind = "timed out" if isinstance(exc, requests.exceptions.Timeout) else "connection failed"
    detail = str(exc)
    if len(detail) > 300:
        detail = detail[:300] + "..."
    return f"{kind}: {detail}" if detail else kind


def encode_search_filter(search_filter: dict[str, Any] | None) -> str | None:
    """CML takes ``search_filter`` as a JSON object in the query string."""
    return json.dumps(search_filter, separators=(",", ":")) if search_filter else None


__all__ = ["RetryPolicy", "Transport", "encode_search_filter"]
