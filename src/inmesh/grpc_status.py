"""gRPC status names by code number: one table for validation, retries, outlier
detection and fault injection (pure, and cheap to import)."""

from __future__ import annotations

__all__ = ["GRPC_STATUS_NAMES"]

GRPC_STATUS_NAMES: tuple[str, ...] = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
"""gRPC status names by code: ``GRPC_STATUS_NAMES[14] == "UNAVAILABLE"``."""
