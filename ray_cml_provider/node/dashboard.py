"""The head's own Ray dashboard, asked from the head's launcher (standard library): Ray's
Jobs and Serve REST APIs with the cluster's token, read from its file at each call (the
history and ``job submit --down`` ask it)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

TIMEOUT_S = 10.0
MOST_BYTES = 64 << 20  # one answer


class Dashboard:
    def __init__(self, url: str, token_path: Path | None):
        self.url = url
        self.token_path = token_path

    def get(self, path: str) -> Any:
        """The JSON answer to ``GET path``; raises ``OSError`` (``urllib.error.HTTPError``
        with the status among them) or ``ValueError``."""
        headers = {"Accept": "application/json"}
        if self.token_path is not None:
            headers["Authorization"] = f"Bearer {self.token_path.read_text().strip()}"
        request = urllib.request.Request(f"{self.url}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            return json.loads(answer.read(MOST_BYTES) or b"null")
