"""Load balancing: which endpoint of a cluster gets the next request.

This module owns the per-endpoint load figures (``StatsTable``, which outlives config
snapshots) and the balancers (``build_balancer``), which are built per snapshot and per
health change: a balancer is an immutable arrangement of endpoints plus the little
mutable state its policy needs (a round-robin cursor, an EDF schedule, a lazily built
hash table). It is pure: no I/O, no clock, no global random generator -- every random
choice comes from the caller's seeded ``random.Random`` in ``PickContext``.

The semantics are Envoy's, configured the way Istio configures Envoy.

Theory of operation
-------------------
A pick has up to three stages, each one skipped when it has nothing to decide:

1. **Priority level.** With locality failover on (Istio: a DestinationRule with
   outlierDetection, locality LB not disabled), endpoints are ranked into priority levels:
   P0 shares region, zone and subzone with the caller, P1 region and zone, P2 region, P3
   the rest (``failover`` entries put their ``to`` region at P3 and push other regions to
   P4; ``failoverPriority`` ranks by leading labels shared with the caller first). Levels
   are then numbered 0..N without gaps, as Istio does. Envoy's health of a level is
   ``min(100, 1.4 × healthy% )`` (overprovisioning factor 1.4, host counts); levels take
   load in order until 100% is handed out, so a level that is 80% healthy still takes all
   the traffic, and one that is 50% healthy keeps 70% and spills 30% to the next level.
   If nothing is healthy anywhere, Envoy's total panic: load is split by host count and
   every level balances over all its endpoints, healthy or not.
2. **Locality.** With ``distribute`` (locality-weighted LB), the first rule whose
   ``from`` matches the caller gives each locality a weight; localities no ``to`` entry
   matches get no traffic at all. A locality's weight is scaled by its own availability
   (``min(1, 1.4 × healthy fraction)``) and localities are picked by an EDF schedule.
3. **Endpoint**, by the policy: round robin, random, least request or consistent hash.

EDF (earliest deadline first) is Envoy's weighted scheduler: every entry has a deadline;
a pick takes the entry with the earliest deadline (ties: the one scheduled first) and
re-schedules it at ``that deadline + 1/weight``. Over a whole cycle each entry is picked
in exact proportion to its weight, and the picks are spread evenly rather than in bursts
(weights 3:1 give A A B A A A B A ..., not A A A B). The weight is evaluated each time an
entry is re-scheduled, which is how weighted least request works: Envoy's weight is
``weight / (active + 1)`` (active_request_bias 1.0), so a loaded endpoint's next deadline
lies further away.

Consistent hashing picks the priority level by ``hash % 100`` (as Envoy does with the
hash it has) and then looks the hash up in the level's ring or Maglev table. Tables hash
``address:port`` with BLAKE2b, which is the same in every process (Python's ``hash()``
is salted per process and would send one user to different endpoints from different
replicas). Endpoints are sorted by address before building, so the order the registry
lists them in does not matter either.

A retry passes the endpoints it already tried in ``exclude``: like Envoy's "previous
hosts" retry predicate with Istio's ``host_selection_retry_max_attempts`` of 5, the pick
is redone at most five times and then the last choice is taken. Consistent hashing does
not re-draw (the hash is fixed) but walks on: the next ring entry, or the Maglev slot of a
perturbed hash, as Envoy does.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import itertools
import math
import random
import threading
import weakref
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Protocol

from inmesh.config.model import (
    ConsistentHash,
    CookieHashKey,
    Distribute,
    HashKey,
    HeaderHashKey,
    LoadBalancerSettings,
    LocalityLbSetting,
    Maglev,
    QueryHashKey,
    SimpleLB,
)
from inmesh.endpoints import Endpoint, EndpointKey, Locality

__all__ = ["Balancer", "EndpointStats", "PickContext", "StatsTable", "build_balancer"]

_RETRY_PICKS: Final = 5  # Istio's host_selection_retry_max_attempts
_OVERPROVISIONING: Final = 140  # Envoy's default overprovisioning factor, in percent
# Envoy's default maximum_ring_size is 8M entries; in Python that ring would take tens of
# seconds and most of a gigabyte, and only a wild weight ratio asks for it, so cap lower.
_MAX_RING_SIZE: Final = 1024 * 1024
_FAILOVER_SPAN: Final = 5  # locality failover ranks 0..4 (Istio multiplies label ranks by it)

# The labels Istio adds to every workload and endpoint from its locality, so that
# failoverPriority can name them without anyone writing them by hand.
_TOPOLOGY_LABELS: Final[Mapping[str, Callable[[Locality], str]]] = MappingProxyType(
    {
        "topology.kubernetes.io/region": lambda loc: loc.region,
        "topology.kubernetes.io/zone": lambda loc: loc.zone,
        "topology.istio.io/subzone": lambda loc: loc.subzone,
    }
)
_NO_LABELS: Final[Mapping[str, str]] = MappingProxyType({})


# --------------------------------------------------------------------------- load figures


class EndpointStats:
    """The live figures of one endpoint: requests in flight.

    The count is the length of a list that ``begin()`` appends to and ``end()`` pops
    from. Both are single operations on the list, atomic under the GIL and under
    free-threaded Python's per-object locks, so no update is ever lost (as ``+= 1`` on an
    attribute can be) and neither takes a lock: a ``with lock`` would cost more than the
    rest of a begin/end pair. Keep the object you called ``begin()`` on and call
    ``end()`` on the same one.
    """

    __slots__ = ("__weakref__", "calls")

    def __init__(self) -> None:
        self.calls: list[None] = []  # one item per request in flight; read its len()

    @property
    def active(self) -> int:
        """Requests in flight to this endpoint."""
        return len(self.calls)

    def begin(self) -> None:
        """A request to this endpoint starts."""
        self.calls.append(None)

    def end(self) -> None:
        """A request to this endpoint is over (answered, failed or cancelled)."""
        try:  # noqa: SIM105 -- contextlib.suppress is a ``with``: twice the cost of the rest
            self.calls.pop()
        except IndexError:
            # Floor at zero: a stray end() must not make an endpoint look idler than idle
            # for the rest of the process's life.
            pass

    def __repr__(self) -> str:
        return f"EndpointStats(active={len(self.calls)})"


class StatsTable:
    """``EndpointStats`` by endpoint key. Owned by the Mesh, so it outlives snapshots.

    Balancers look their endpoints' figures up once, when they are built. So that such a
    reference can never go stale, a forgotten entry lives on (weakly) for as long as
    anything still holds it, and ``get()`` hands that same object out again: one key
    never has two live figures.
    """

    __slots__ = ("_detached", "_entries", "_lock")

    def __init__(self) -> None:
        self._entries: dict[EndpointKey, EndpointStats] = {}
        self._detached: weakref.WeakValueDictionary[EndpointKey, EndpointStats] = (
            weakref.WeakValueDictionary()
        )
        self._lock = threading.Lock()

    def get(self, key: EndpointKey) -> EndpointStats:
        """The figures of ``key``, created on first use."""
        # Lock-free on the hot path: dict reads are atomic; only creation needs the lock,
        # so that two threads cannot each create (and count on) their own object.
        stats = self._entries.get(key)
        if stats is None:
            with self._lock:
                stats = self._entries.get(key)
                if stats is None:
                    stats = self._detached.pop(key, None) or EndpointStats()
                    self._entries[key] = stats
        return stats

    def retain(self, keys: Collection[EndpointKey]) -> None:
        """Forget the endpoints not in ``keys`` that have no request in flight."""
        keep = keys if isinstance(keys, set | frozenset) else set(keys)
        with self._lock:
            gone = [k for k, s in self._entries.items() if k not in keep and s.active == 0]
            for key in gone:
                self._detached[key] = self._entries.pop(key)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries


# --------------------------------------------------------------------------- the contract


@dataclass(frozen=True, slots=True, kw_only=True)
class PickContext:
    """What one pick may use besides the balancer itself."""

    rng: random.Random
    """The caller's seeded generator: the only randomness a pick uses."""
    hash_key: bytes | None = None
    """Consistent-hash input; ``None`` under a hash policy means a random pick (as Envoy)."""
    exclude: Collection[EndpointKey] = ()
    """Endpoints this request already tried: avoided if possible (at most 5 re-picks)."""


class Balancer(Protocol):
    """Chooses an endpoint for each request of one cluster."""

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        """Every endpoint this balancer may choose (unhealthy ones too: panic mode)."""
        ...

    def pick(self, ctx: PickContext) -> Endpoint | None:
        """The endpoint for this attempt; ``None`` only when there is no endpoint at all."""
        ...

    def describe(self) -> str:
        """One line for ``inmesh explain``."""
        ...


# --------------------------------------------------------------------------- helpers


def _weight(endpoint: Endpoint) -> int:
    # Envoy requires weights >= 1; a zero or negative weight from a hand-written
    # WorkloadEntry must not divide by zero or silently starve the endpoint.
    return endpoint.weight if endpoint.weight > 0 else 1


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _locality_text(locality: Locality) -> str:
    return str(locality) or "(no locality)"


def _locality_matches(locality: Locality, pattern: str) -> bool:
    """Istio's LocalityMatch: ``*`` matches any part, and so does a missing zone/subzone."""
    region, zone, subzone = [*pattern.split("/", 2), "", ""][:3]
    return (
        region in ("*", locality.region)
        and zone in ("*", "", locality.zone)
        and subzone in ("*", "", locality.subzone)
    )


def _label_value(labels: Mapping[str, str], locality: Locality, name: str) -> str:
    value = labels.get(name)
    if value is None:
        from_locality = _TOPOLOGY_LABELS.get(name)
        value = from_locality(locality) if from_locality is not None else ""
    return value


def _hash_key_text(key: HashKey) -> str:
    if isinstance(key, HeaderHashKey):
        return f"header {key.name}"
    if isinstance(key, CookieHashKey):
        return f"cookie {key.name}"
    if isinstance(key, QueryHashKey):
        return f"query parameter {key.name}"
    return "source IP"


# --------------------------------------------------------------------------- EDF


class _Edf:
    """Envoy's earliest-deadline-first scheduler over entries ``0..count-1``.

    ``weigh(i)`` must be positive; it is called when entry ``i`` is (re)scheduled, so a
    weight that changes over time (least request) takes effect on the entry's next turn.
    Deadlines are floats like Envoy's: over a long run shares stay within one pick of
    exact. The counter breaks ties in scheduling order (FIFO), which is what makes equal
    weights a plain rotation.
    """

    __slots__ = ("_heap", "_lock", "_order", "_weigh")

    def __init__(self, count: int, weigh: Callable[[int], float]) -> None:
        self._weigh = weigh
        self._order = itertools.count()
        self._heap = [(1.0 / weigh(i), next(self._order), i) for i in range(count)]
        heapq.heapify(self._heap)
        self._lock = threading.Lock()

    def pick(self) -> int:
        with self._lock:
            deadline, _, i = self._heap[0]
            heapq.heapreplace(self._heap, (deadline + 1.0 / self._weigh(i), next(self._order), i))
        return i


# --------------------------------------------------------------------------- endpoint pickers


class _Picker(Protocol):
    """Chooses among a fixed, non-empty set of endpoints."""

    def pick(self, rng: random.Random) -> Endpoint: ...


class _RoundRobin:
    """Equal weights: a plain rotation, O(1). (Envoy's EDF degenerates to exactly this.)"""

    __slots__ = ("_endpoints", "_lock", "_next")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._next = 0
        self._lock = threading.Lock()

    def pick(self, rng: random.Random) -> Endpoint:  # noqa: ARG002 -- the _Picker signature
        with self._lock:
            i = self._next
            self._next = i + 1 if i + 1 < len(self._endpoints) else 0
        return self._endpoints[i]


class _WeightedRoundRobin:
    """Unequal weights: Envoy's weighted round robin, an EDF schedule, O(log n)."""

    __slots__ = ("_edf", "_endpoints")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        weights = [_weight(ep) for ep in self._endpoints]
        self._edf = _Edf(len(weights), weights.__getitem__)

    def pick(self, rng: random.Random) -> Endpoint:  # noqa: ARG002 -- the _Picker signature
        return self._endpoints[self._edf.pick()]


# Draws use ``int(rng.random() * n)`` rather than ``rng.randrange(n)``: a quarter of the
# cost, and a bias of n / 2**53, far below anything load balancing could notice.


class _Random:
    """Uniform, O(1)."""

    __slots__ = ("_endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)

    def pick(self, rng: random.Random) -> Endpoint:
        return self._endpoints[int(rng.random() * len(self._endpoints))]


class _WeightedRandom:
    """By weight: a uniform draw below the total weight, bisected in the running sums."""

    __slots__ = ("_cumulative", "_endpoints", "_total")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._cumulative = list(itertools.accumulate(_weight(ep) for ep in self._endpoints))
        self._total = self._cumulative[-1]

    def pick(self, rng: random.Random) -> Endpoint:
        return self._endpoints[bisect.bisect_right(self._cumulative, rng.random() * self._total)]


class _PowerOfTwoChoices:
    """Equal weights: two distinct endpoints at random, the one with fewer requests in flight.

    O(1), and nearly as good as scanning for the least loaded endpoint while never
    herding every caller onto the same one (Mitzenmacher's power of two choices).
    Ties go to the first draw, which is itself random.
    """

    __slots__ = ("_endpoints", "_stats")

    def __init__(self, endpoints: Sequence[Endpoint], stats: StatsTable) -> None:
        self._endpoints = tuple(endpoints)
        self._stats = tuple(stats.get(ep.key) for ep in self._endpoints)

    def pick(self, rng: random.Random) -> Endpoint:
        n = len(self._endpoints)
        if n == 1:
            return self._endpoints[0]
        first = int(rng.random() * n)
        second = int(rng.random() * (n - 1))
        if second >= first:  # draw from the other n-1, so the two are distinct
            second += 1
        stats = self._stats
        if len(stats[second].calls) < len(stats[first].calls):  # ``active``, sans property
            return self._endpoints[second]
        return self._endpoints[first]


class _WeightedLeastRequest:
    """Unequal weights: Envoy's EDF with weight ``weight / (active + 1)``, O(log n)."""

    __slots__ = ("_edf", "_endpoints")

    def __init__(self, endpoints: Sequence[Endpoint], stats: StatsTable) -> None:
        self._endpoints = tuple(endpoints)
        weights = tuple(_weight(ep) for ep in self._endpoints)
        figures = tuple(stats.get(ep.key) for ep in self._endpoints)

        def weigh(i: int) -> float:
            return weights[i] / (figures[i].active + 1)

        self._edf = _Edf(len(weights), weigh)

    def pick(self, rng: random.Random) -> Endpoint:  # noqa: ARG002 -- the _Picker signature
        return self._endpoints[self._edf.pick()]


class _LocalityWeighted:
    """Envoy's locality-weighted LB: an EDF pick of the locality, then its own picker."""

    __slots__ = ("_edf", "_pickers")

    def __init__(self, children: Sequence[tuple[float, _Picker]]) -> None:
        self._pickers = tuple(picker for _, picker in children)
        weights = [weight for weight, _ in children]
        self._edf = _Edf(len(weights), weights.__getitem__)

    def pick(self, rng: random.Random) -> Endpoint:
        return self._pickers[self._edf.pick()].pick(rng)


def _make_picker(policy: SimpleLB, endpoints: Sequence[Endpoint], stats: StatsTable) -> _Picker:
    equal = len({_weight(ep) for ep in endpoints}) == 1
    if policy is SimpleLB.ROUND_ROBIN:
        return _RoundRobin(endpoints) if equal else _WeightedRoundRobin(endpoints)
    if policy is SimpleLB.RANDOM:
        return _Random(endpoints) if equal else _WeightedRandom(endpoints)
    if equal:
        return _PowerOfTwoChoices(endpoints, stats)
    return _WeightedLeastRequest(endpoints, stats)


# --------------------------------------------------------------------------- hash tables


class _HashTable(Protocol):
    """Maps a 64-bit hash to an endpoint; ``attempt`` > 0 walks on for a retry."""

    def lookup(self, h: int, attempt: int) -> Endpoint: ...


class _RingHash:
    """Envoy's ring hash (ketama): points on a 64-bit circle, the first point at or after h.

    Each endpoint gets points in proportion to its (normalized) weight; the ring is
    scaled so the lightest endpoint gets at least ``minimum_size × its share`` whole
    points. Fractional shares are handed out by running sums, as Envoy does, so the total
    stays close to the target. Built on first lookup and cached (a race only builds twice).
    """

    __slots__ = ("_minimum_size", "_ring", "_weighted")

    def __init__(self, weighted: Sequence[tuple[Endpoint, float]], minimum_size: int) -> None:
        self._weighted = tuple(weighted)
        self._minimum_size = max(1, minimum_size)
        self._ring: tuple[list[int], list[Endpoint]] | None = None

    def lookup(self, h: int, attempt: int) -> Endpoint:
        ring = self._ring
        if ring is None:
            ring = self._ring = self._build()
        hashes, hosts = ring
        i = bisect.bisect_left(hashes, h)
        if i == len(hashes):  # past the last point: wrap around the circle
            i = 0
        if attempt:
            # Envoy: "behave as if this host was not in the ring" by taking the next point.
            i = (i + attempt) % len(hashes)
        return hosts[i]

    def _build(self) -> tuple[list[int], list[Endpoint]]:
        total = sum(weight for _, weight in self._weighted)
        normalized = [(ep, weight / total) for ep, weight in self._weighted]
        smallest = min(share for _, share in normalized)
        scale = min(math.ceil(smallest * self._minimum_size) / smallest, float(_MAX_RING_SIZE))
        points: list[tuple[int, Endpoint]] = []
        current = target = 0.0
        for ep, share in normalized:
            prefix = f"{ep}_".encode()
            target += scale * share
            i = 0
            while current < target:
                points.append((_hash64(prefix + str(i).encode()), ep))
                i += 1
                current += 1
        points.sort(key=lambda point: point[0])  # by hash only: endpoints have no order
        return [h for h, _ in points], [ep for _, ep in points]


class _MaglevTable:
    """Envoy's Maglev: a lookup table of prime size M, ``table[h % M]``.

    Theory (Eisenbud et al., NSDI 2016): each endpoint has its own permutation of the
    slots, ``offset + j × skip (mod M)`` with ``skip`` in 1..M-1 (M prime makes every
    skip a full cycle). Endpoints take turns claiming the next still-free slot of their
    permutation until the table is full, so each holds ~M/n slots and removing one only
    frees its own slots (plus a little churn). Weights, as in Envoy: an endpoint with
    weight w takes a turn only in the rounds where ``round × w`` has caught up with its
    claims × the largest weight, so its share of turns is w / max weight. Turns are
    ordered by (round, endpoint index), exactly Envoy's nested loops, but through a heap
    so that rounds an endpoint sits out cost nothing. Filling the table takes ~M·ln M
    probes whatever the endpoint count, which in Python is 30-200 ms for M = 65537; so
    the table is built on first lookup, not with the balancer, and cached.
    """

    __slots__ = ("_size", "_table", "_weighted")

    def __init__(self, weighted: Sequence[tuple[Endpoint, float]], table_size: int) -> None:
        self._weighted = tuple(weighted)
        self._size = max(2, table_size)  # prime-ness is validated with the config
        self._table: list[Endpoint] | None = None

    def lookup(self, h: int, attempt: int) -> Endpoint:
        table = self._table
        if table is None:
            table = self._table = self._build()
        if attempt:
            # Envoy's retry perturbation: XOR with a value that has most bits set, so the
            # retry lands far from the first slot.
            h ^= (1 << 64) - attempt
        return table[h % self._size]

    def _build(self) -> list[Endpoint]:
        size = self._size
        hosts = [ep for ep, _ in self._weighted]
        positions: list[int] = []  # each endpoint's next slot in its own permutation
        skips: list[int] = []
        for ep in hosts:
            digest = hashlib.blake2b(str(ep).encode(), digest_size=16).digest()
            positions.append(int.from_bytes(digest[:8], "big") % size)
            skips.append(int.from_bytes(digest[8:], "big") % (size - 1) + 1)
        owner = [-1] * size
        for i in self._turns():
            slot, skip = positions[i], skips[i]
            while owner[slot] >= 0:  # taken: next in this endpoint's permutation
                slot += skip
                if slot >= size:
                    slot -= size
            owner[slot] = i
            positions[i] = slot + skip if slot + skip < size else slot + skip - size
        return [hosts[i] for i in owner]

    def _turns(self) -> Iterator[int]:
        """The endpoint that claims each slot in turn: exactly ``size`` turns."""
        n, size = len(self._weighted), self._size
        weights = [weight for _, weight in self._weighted]
        if len(set(weights)) == 1:  # equal weights: everyone, every round
            for turn in range(size):
                yield turn % n
            return
        heaviest = max(weights)
        claimed = [0.0] * n  # Envoy's target_weight_
        turns = [(1, i) for i in range(n)]  # (round of the endpoint's next turn, endpoint)
        for _ in range(size):
            round_, i = turns[0]
            yield i
            claimed[i] += heaviest
            later = max(round_ + 1, math.ceil(claimed[i] / weights[i]))
            heapq.heapreplace(turns, (later, i))


# --------------------------------------------------------------------------- arrangement


@dataclass(frozen=True, slots=True, kw_only=True)
class _Arrangement:
    """Where the endpoints stand: priority levels, locality weights, health, load."""

    endpoints: tuple[Endpoint, ...]  # in play, in the caller's order
    levels: tuple[tuple[Endpoint, ...], ...]  # by priority, each non-empty
    unhealthy: frozenset[EndpointKey]
    loads: tuple[int, ...]  # percent of the traffic per level, sums to 100
    panic: bool  # no healthy endpoint anywhere: every level uses all its endpoints
    locality_weights: Mapping[Locality, int] | None  # distribute; None: not locality-weighted
    distribute_from: str = ""
    prioritized: bool = False  # failover put endpoints into priority levels

    def usable(self, level: int) -> tuple[Endpoint, ...]:
        members = self.levels[level]
        if self.panic or not self.unhealthy:
            return members
        return tuple(ep for ep in members if ep.key not in self.unhealthy)

    def locality_shares(self, level: int) -> list[tuple[float, tuple[Endpoint, ...]]]:
        """Locality-weighted: (effective weight, healthy endpoints) per locality in play.

        Envoy scales a locality's weight by its availability, ``min(1, 1.4 × healthy
        fraction)``, so a half-ejected locality gives up some of its share. Empty when
        not locality-weighted, in panic, or when no locality with weight has a healthy
        endpoint: then Envoy falls back to all the level's usable endpoints.
        """
        if self.locality_weights is None or self.panic:
            return []
        by_locality: dict[Locality, list[Endpoint]] = {}
        for ep in self.levels[level]:
            by_locality.setdefault(ep.locality, []).append(ep)
        shares: list[tuple[float, tuple[Endpoint, ...]]] = []
        for locality, members in by_locality.items():
            healthy = tuple(ep for ep in members if ep.key not in self.unhealthy)
            availability = min(1.0, _OVERPROVISIONING / 100 * len(healthy) / len(members))
            weight = self.locality_weights.get(locality, 0) * availability
            if weight > 0:
                shares.append((weight, healthy))
        return shares


def _priority_loads(
    levels: Sequence[Sequence[Endpoint]], unhealthy: frozenset[EndpointKey]
) -> tuple[tuple[int, ...], bool]:
    """Envoy's per-priority load (integer percent) and whether it is in total panic."""
    counts = [
        (sum(ep.key not in unhealthy for ep in level) if unhealthy else len(level), len(level))
        for level in levels
    ]
    health = [min(100, _OVERPROVISIONING * healthy // total) for healthy, total in counts]
    normalized = min(100, sum(health))
    if normalized == 0:
        # Total panic: nothing is healthy enough to count, so load follows host counts and
        # every level balances over all of its endpoints.
        all_hosts = sum(total for _, total in counts)
        loads = [100 * total // all_hosts for _, total in counts]
        loads[0] += 100 - sum(loads)
        return tuple(loads), True
    loads = []
    remaining = 100
    for level_health in health:
        # Scaling by the normalized total hands out all 100% even when the levels
        # together are less than fully healthy.
        load = min(remaining, level_health * 100 // normalized)
        loads.append(load)
        remaining -= load
    if remaining:  # rounding leftovers go to the first level that has healthy hosts
        loads[next(i for i, h in enumerate(health) if h > 0)] += remaining
    return tuple(loads), False


def _distribute(
    endpoints: Sequence[Endpoint], rule: Distribute
) -> tuple[tuple[Endpoint, ...], dict[Locality, int]]:
    """Istio's applyLocalityWeights: (endpoints in play, weight per locality).

    Each ``to`` entry claims the localities it matches that no earlier entry claimed and
    shares its weight among them by their total endpoint weight, rounded up. Localities
    that no entry claims lose their endpoints. (Istio leaves a locality whose computed
    weight is 0 at its original weight; here ``0`` means no traffic, as written.)
    """
    group_weight: dict[Locality, int] = {}
    for ep in endpoints:
        group_weight[ep.locality] = group_weight.get(ep.locality, 0) + _weight(ep)
    unclaimed = list(group_weight)
    weights: dict[Locality, int] = {}
    for pattern, percent in rule.to:
        matched = [loc for loc in unclaimed if _locality_matches(loc, pattern)]
        unclaimed = [loc for loc in unclaimed if loc not in matched]
        total = sum(group_weight[loc] for loc in matched)
        for loc in matched:
            weights[loc] = math.ceil(group_weight[loc] * percent / total)
    return tuple(ep for ep in endpoints if ep.locality in weights), weights


def _locality_rank(caller: Locality, locality: Locality, setting: LocalityLbSetting) -> int:
    """Istio's LbPriority plus region failover: 0..4, lower is preferred."""
    if locality.region == caller.region:
        if locality.zone == caller.zone:
            return 0 if locality.subzone == caller.subzone else 1
        return 2
    for rule in setting.failover:
        if rule.from_ == caller.region:
            return 3 if locality.region == rule.to else 4
    return 3


def _label_rank(endpoint: Endpoint, names: Sequence[str], wanted: Sequence[str]) -> int:
    """Istio's failoverPriority: 0 if every label matches, else len - leading matches."""
    for j, (name, value) in enumerate(zip(names, wanted, strict=True)):
        if _label_value(endpoint.labels, endpoint.locality, name) != value:
            return len(names) - j
    return 0


def _failover_levels(
    endpoints: Sequence[Endpoint],
    setting: LocalityLbSetting,
    caller: Locality,
    caller_labels: Mapping[str, str],
) -> tuple[tuple[Endpoint, ...], ...]:
    """Istio's applyFailoverPriorities + applyLocalityFailover, numbered without gaps."""
    names: list[str] = []
    wanted: list[str] = []
    for item in setting.failover_priority:
        parts = item.split("=")
        names.append(parts[0])
        # "label=value" compares endpoints with that value instead of the caller's own.
        wanted.append(
            parts[1] if len(parts) == 2 else _label_value(caller_labels, caller, parts[0])
        )
    # Istio skips label ranking for a proxy without labels; its labels include the
    # locality's topology labels, so a known locality counts as labels.
    caller_has_labels = bool(caller_labels) or bool(str(caller))
    by_labels = bool(names) and caller_has_labels
    # With failoverPriority, locality ranking applies only if failover is also written.
    by_locality = bool(str(caller)) and (not names or bool(setting.failover))
    ranks: dict[int, list[Endpoint]] = {}
    for ep in endpoints:
        rank = _label_rank(ep, names, wanted) * _FAILOVER_SPAN if by_labels else 0
        if by_locality:
            rank += _locality_rank(caller, ep.locality, setting)
        ranks.setdefault(rank, []).append(ep)
    return tuple(tuple(ranks[rank]) for rank in sorted(ranks))


def _arrange(
    endpoints: Sequence[Endpoint],
    settings: LoadBalancerSettings | None,
    *,
    caller_locality: Locality | None,
    caller_labels: Mapping[str, str],
    failover: bool,
    unhealthy: Collection[EndpointKey],
) -> _Arrangement:
    setting = (settings.locality if settings else None) or LocalityLbSetting()
    caller = caller_locality or Locality()
    in_play = tuple(endpoints)
    levels: tuple[tuple[Endpoint, ...], ...] = (in_play,)
    weights: dict[Locality, int] | None = None
    distribute_from = ""
    prioritized = False
    if setting.enabled and setting.distribute:
        # Distribute and failover are exclusive in Istio: with distribute written,
        # failover is off even when no rule applies to this caller.
        rule = next((r for r in setting.distribute if _locality_matches(caller, r.from_)), None)
        if str(caller) and rule is not None:
            in_play, weights = _distribute(in_play, rule)
            levels = (in_play,)
            distribute_from = rule.from_
    elif setting.enabled and failover and in_play:
        levels = _failover_levels(in_play, setting, caller, caller_labels)
        prioritized = True
    bad = frozenset(unhealthy)
    if bad:
        bad = bad.intersection(ep.key for ep in in_play)
    if not in_play:
        return _Arrangement(
            endpoints=(), levels=(), unhealthy=bad, loads=(), panic=False, locality_weights=None
        )
    loads, panic = _priority_loads(levels, bad)
    return _Arrangement(
        endpoints=in_play,
        levels=levels,
        unhealthy=bad,
        loads=loads,
        panic=panic,
        locality_weights=weights,
        distribute_from=distribute_from,
        prioritized=prioritized,
    )


# --------------------------------------------------------------------------- balancers


class _BalancerBase:
    """What every balancer shares: the arrangement, the endpoint list, ``describe()``."""

    __slots__ = ("_arrangement", "_cumulative", "_policy_text")

    def __init__(self, arrangement: _Arrangement, policy_text: str) -> None:
        self._arrangement = arrangement
        self._policy_text = policy_text
        # Cumulative load of the levels that take traffic, for one bisect per pick.
        self._cumulative = list(itertools.accumulate(load for load in arrangement.loads if load))

    @property
    def endpoints(self) -> Sequence[Endpoint]:
        return self._arrangement.endpoints

    def describe(self) -> str:
        a = self._arrangement
        parts = [f"{self._policy_text} over {len(a.endpoints)} endpoints"]
        if a.locality_weights is not None:
            counts = _count_by_locality(a.endpoints)
            shares = ", ".join(
                f"{_locality_text(loc)} {weight} ({counts[loc]})"
                for loc, weight in a.locality_weights.items()
            )
            parts.append(f"locality distribute from {a.distribute_from}: {shares}")
        if a.prioritized:
            levels = ", ".join(
                f"P{i} "
                + " + ".join(
                    f"{_locality_text(loc)} ({n})" for loc, n in _count_by_locality(level).items()
                )
                for i, level in enumerate(a.levels)
            )
            parts.append(f"locality {levels}")
        if a.loads and a.loads[0] != 100:
            parts.append("load " + ", ".join(f"P{i} {load}%" for i, load in enumerate(a.loads)))
        if a.unhealthy:
            parts.append(f"{len(a.unhealthy)} of {len(a.endpoints)} unhealthy")
        if a.panic:
            parts.append("panic: no healthy endpoint, balancing over all")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


def _count_by_locality(endpoints: Sequence[Endpoint]) -> dict[Locality, int]:
    counts: dict[Locality, int] = {}
    for ep in endpoints:
        counts[ep.locality] = counts.get(ep.locality, 0) + 1
    return counts


class _NoEndpoints(_BalancerBase):
    __slots__ = ()

    def pick(self, ctx: PickContext) -> Endpoint | None:  # noqa: ARG002 -- Balancer.pick
        return None


class _SimpleBalancer(_BalancerBase):
    """Round robin, random or least request, behind priority levels and localities."""

    __slots__ = ("_only", "_pickers")

    def __init__(self, arrangement: _Arrangement, policy: SimpleLB, stats: StatsTable) -> None:
        super().__init__(arrangement, _simple_text(policy, arrangement.endpoints))
        self._pickers: list[_Picker] = []
        for level, load in enumerate(arrangement.loads):
            if not load:
                continue
            shares = arrangement.locality_shares(level)
            if len(shares) > 1:
                self._pickers.append(
                    _LocalityWeighted(
                        [
                            (weight, _make_picker(policy, members, stats))
                            for weight, members in shares
                        ]
                    )
                )
            elif shares:
                self._pickers.append(_make_picker(policy, shares[0][1], stats))
            else:
                self._pickers.append(_make_picker(policy, arrangement.usable(level), stats))
        self._only = self._pickers[0] if len(self._pickers) == 1 else None

    def pick(self, ctx: PickContext) -> Endpoint | None:
        rng = ctx.rng
        only = self._only
        picker = only or self._pickers[bisect.bisect_right(self._cumulative, rng.random() * 100)]
        chosen = picker.pick(rng)
        exclude = ctx.exclude
        if exclude:
            for _ in range(_RETRY_PICKS):
                if chosen.key not in exclude:
                    break
                if only is None:
                    picker = self._pickers[
                        bisect.bisect_right(self._cumulative, rng.random() * 100)
                    ]
                chosen = picker.pick(rng)
        return chosen


class _HashBalancer(_BalancerBase):
    """Ring hash or Maglev, one table per priority level that takes traffic."""

    __slots__ = ("_only", "_tables")

    def __init__(self, arrangement: _Arrangement, policy: ConsistentHash) -> None:
        table = policy.table
        if isinstance(table, Maglev):
            text = f"MAGLEV (table size {table.table_size})"
        else:
            text = f"RING_HASH (minimum ring size {table.minimum_ring_size})"
        super().__init__(arrangement, f"{text} on {_hash_key_text(policy.key)}")
        self._tables: list[_HashTable] = []
        for level, load in enumerate(arrangement.loads):
            if not load:
                continue
            weighted = _hash_weights(arrangement, level)
            # Sorted by address so that every process builds the same table whatever
            # order the registry listed the endpoints in.
            weighted.sort(key=lambda pair: pair[0].key)
            if isinstance(table, Maglev):
                self._tables.append(_MaglevTable(weighted, table.table_size))
            else:
                self._tables.append(_RingHash(weighted, table.minimum_ring_size))
        self._only = self._tables[0] if len(self._tables) == 1 else None

    def pick(self, ctx: PickContext) -> Endpoint | None:
        key = ctx.hash_key
        h = _hash64(key) if key is not None else ctx.rng.getrandbits(64)
        table = self._only or self._tables[bisect.bisect_right(self._cumulative, h % 100)]
        chosen = table.lookup(h, 0)
        exclude = ctx.exclude
        if exclude:
            for attempt in range(1, _RETRY_PICKS + 1):
                if chosen.key not in exclude:
                    break
                chosen = table.lookup(h, attempt)
        return chosen


def _hash_weights(arrangement: _Arrangement, level: int) -> list[tuple[Endpoint, float]]:
    """Endpoint weights for a hash table; locality weights folded in as Envoy does.

    A hash policy cannot pick a locality first (the key must decide everything), so
    Envoy gives each endpoint ``locality share × its weight / its locality's weight``.
    """
    shares = arrangement.locality_shares(level)
    if not shares:
        return [(ep, float(_weight(ep))) for ep in arrangement.usable(level)]
    total = sum(weight for weight, _ in shares)
    weighted: list[tuple[Endpoint, float]] = []
    for weight, members in shares:
        group = sum(_weight(ep) for ep in members)
        weighted.extend((ep, weight / total * _weight(ep) / group) for ep in members)
    return weighted


def _simple_text(policy: SimpleLB, endpoints: Sequence[Endpoint]) -> str:
    weighted = len({_weight(ep) for ep in endpoints}) > 1
    if policy is SimpleLB.ROUND_ROBIN:
        return "ROUND_ROBIN (weighted, EDF)" if weighted else "ROUND_ROBIN"
    if policy is SimpleLB.RANDOM:
        return "RANDOM (weighted)" if weighted else "RANDOM"
    if weighted:
        return "LEAST_REQUEST (weighted, EDF of weight/(active+1))"
    return "LEAST_REQUEST (power of two choices)"


def build_balancer(
    endpoints: Sequence[Endpoint],
    settings: LoadBalancerSettings | None,
    *,
    stats: StatsTable,
    caller_locality: Locality | None = None,
    failover: bool = False,
    unhealthy: Collection[EndpointKey] = (),
    caller_labels: Mapping[str, str] = _NO_LABELS,
) -> Balancer:
    """The balancer for one cluster's endpoints under a DestinationRule's LB settings.

    ``settings`` None (or neither ``simple`` nor ``consistent_hash``) means LEAST_REQUEST,
    Istio's default. ``caller_locality`` is the calling workload's locality: without one,
    ``distribute`` and locality failover are off. ``caller_labels`` are its labels, for
    ``failoverPriority`` (the locality's topology labels are added to them, and to each
    endpoint's, as Istio does). ``failover`` is whether the DestinationRule has
    outlierDetection: Istio arranges priority levels only then. ``unhealthy`` endpoints
    are skipped while any endpoint in play is healthy.

    Rebuild it whenever the endpoints, the settings or the health change (each build is
    O(n); hash tables are built on the first pick, not here). ``stats`` must be the
    Mesh's long-lived table: least request reads the figures the transport updates.
    """
    arrangement = _arrange(
        endpoints,
        settings,
        caller_locality=caller_locality,
        caller_labels=caller_labels,
        failover=failover,
        unhealthy=unhealthy,
    )
    hashing = settings.consistent_hash if settings else None
    simple = (settings.simple if settings else None) or SimpleLB.LEAST_REQUEST
    if not arrangement.endpoints:
        text = _simple_text(simple, ()) if hashing is None else "CONSISTENT_HASH"
        return _NoEndpoints(arrangement, text)
    if hashing is not None:
        return _HashBalancer(arrangement, hashing)
    return _SimpleBalancer(arrangement, simple, stats)
