"""Errors the emulator answers with, in CML's (grpc-gateway) error shape."""

from __future__ import annotations

# HTTP status -> gRPC code, as grpc-gateway maps them.
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 429: 8, 500: 13, 503: 14}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        return {
            "error": self.message,
            "code": GRPC_CODES.get(self.status, 2),
            "message": self.message,
            "details": [],
        }


def invalid(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)
