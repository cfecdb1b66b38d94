"""Calling an OpenAI-compatible endpoint the way its users do (``requests``, no SDK): one
streamed chat completion, timed. Shared by the LLM demo, its test and the benchmarks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import requests


@dataclass
class StreamedAnswer:
    status: int
    text: str = ""
    error: str = ""
    sent_at: float = 0.0  # time.time() when the request left
    first_token_at: float | None = None
    done_at: float = 0.0
    pieces: list[str] = field(default_factory=list)
    fingerprint: str = ""
    prompt_tokens: int = 0  # from the stream's usage event
    completion_tokens: int = 0

    @property
    def first_token_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at


def stream_chat(
    base_url: str,
    model: str,
    prompt: str,
    key: str | None = None,
    max_tokens: int = 32,
    on_piece: Callable[[str], None] | None = None,
    timeout_s: float = 900,
    headers: dict[str, str] | None = None,
) -> StreamedAnswer:
    """POST ``{base_url}/chat/completions`` with ``"stream": true``; read the events as they
    come (``on_piece`` sees each piece of text). ``key`` goes as ``Authorization: Bearer``;
    ``headers`` are sent too (a login, or the key as ``X-Endpoint-Key``)."""
    headers = {**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    answer = StreamedAnswer(status=0, sent_at=time.time())
    with requests.post(
        f"{base_url.rstrip('/')}/chat/completions",
        json={
            "model": model,
            "stream": True,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": prompt}],
            "stream_options": {"include_usage": True},
        },
        headers=headers,
        stream=True,
        timeout=timeout_s,
    ) as response:
        answer.status = response.status_code
        if response.status_code != 200:
            answer.error = response.text[-2000:]
            answer.done_at = time.time()
            return answer
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            answer.fingerprint = event.get("system_fingerprint") or answer.fingerprint
            usage = event.get("usage") or {}
            answer.prompt_tokens = usage.get("prompt_tokens") or answer.prompt_tokens
            answer.completion_tokens = usage.get("completion_tokens") or answer.completion_tokens
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    if answer.first_token_at is None:
                        answer.first_token_at = time.time()
                    answer.pieces.append(piece)
                    if on_piece:
                        on_piece(piece)
    answer.text = "".join(answer.pieces)
    answer.done_at = time.time()
    return answer
