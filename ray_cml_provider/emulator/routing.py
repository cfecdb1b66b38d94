"""Requests, responses and the route table: HTTP shapes with no CML knowledge.

A route is ``METHOD /path/{param}/...``; ``{path}`` matches the rest of a file path
(slashes included), any other ``{param}`` one segment. A handler takes a ``Request`` and
returns a ``Response`` or raises ``ApiError``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import unquote

from ray_cml_provider.emulator.errors import invalid


@dataclass
class Request:
    method: str
    template: str
    params: dict[str, str]
    query: dict[str, str]
    headers: Message
    body: bytes

    def json(self) -> Any:
        if not self.body:
            return {}
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None


@dataclass
class Response:
    status: int = 200
    body: Any = None
    raw: bytes | None = None
    headers: dict[str, str] | None = None
    dropped: bool = False  # done, but the client gets no answer


Handler = Callable[[Request], Response]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(self, method: str, template: str, handler: Handler) -> None:
        pattern = re.escape(template)
        pattern = pattern.replace(re.escape("{path}"), "(?P<path>.*?)")
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", pattern)
        self._routes.append(Route(method, template, re.compile(f"^{pattern}/?$"), handler))

    def match(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        """The route for ``method path`` and its decoded parameters, or (None, {})."""
        for route in self._routes:
            found = route.pattern.match(path)
            if found and route.method == method:
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
        return None, {}
