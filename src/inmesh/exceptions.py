"""The exceptions inmesh raises.

Setup and configuration failures are ``MeshError``s. A failure of one call reaches the
caller in its own library's terms (``httpx.*Error``, ``grpc.RpcError``) with the mesh's
reason chained as ``__cause__``; that reason is an ``UpstreamError``.

::

    MeshError
     ├── ConfigError (also ValueError)       a resource failed validation; carries every Problem
     ├── RegistryError (also OSError)        a registry source cannot be read or watched
     ├── MissingExtraError (also ImportError) an optional part was used without its extra
     ├── UpstreamError                        the mesh's reason behind a per-call httpx/grpc error
     └── CircuitOpenError (also pybreaker.CircuitBreakerError)
                                              a ``mesh.breaker(...)`` refused a call while open;
                                              defined in inmesh.resilience.breaker (imported
                                              lazily, so ``import inmesh`` loads no pybreaker)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConfigError",
    "MeshError",
    "MissingExtraError",
    "Problem",
    "RegistryError",
    "UpstreamError",
]


class MeshError(Exception):
    """The root of every exception inmesh raises itself."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with the configuration, located as precisely as the source allows."""

    source: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where} {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(MeshError, ValueError):
    """Configuration that inmesh refuses: every problem found, each with source, line and path."""

    def __init__(self, problems: list[Problem] | tuple[Problem, ...]) -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RegistryError(MeshError, OSError):
    """A registry source cannot be read or watched (a missing path, an unreachable etcd)."""


class MissingExtraError(MeshError, ImportError):
    """An optional part of inmesh was used without the extra that installs it."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(
            f"{feature} needs the optional dependency {module!r}: pip install 'inmesh[{extra}]'"
        )


class UpstreamError(MeshError):
    """Why the mesh could not complete a call; chained under the transport's own error."""
