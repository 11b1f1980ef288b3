"""Endpoints and localities: the values that balancers choose among."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["Endpoint", "EndpointKey", "Locality"]

EndpointKey = tuple[str, int]
"""(address, port): what identifies an endpoint across snapshots."""

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Locality:
    """Istio's ``region/zone/subzone``; empty parts are unknown."""

    region: str = ""
    zone: str = ""
    subzone: str = ""

    @classmethod
    def parse(cls, text: str | None) -> Locality:
        if not text:
            return cls()
        parts = [*text.split("/", 2), "", ""]
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class Endpoint:
    """One network endpoint of a service.

    Equality and hashing go by ``key`` (address and port): the same address seen in two
    snapshots is the same endpoint, so state keyed by it (active requests, ejections)
    carries over a config push.
    """

    address: str
    port: int
    weight: int = 1
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    locality: Locality = field(default_factory=Locality)
    service_account: str | None = None
    # (address, port), made once: balancers, stats and pools look it up on every request.
    key: EndpointKey = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.address, self.port))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash((self.address, self.port))

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"
