"""How long one pick takes, at 10 and at 10,000 endpoints, per balancing policy.

Run: ``PYTHONPATH=src python benchmarks/bench_balancer.py``. A plain script, not run by CI.

Round robin, random and least request with equal weights are O(1) per pick, so their
10k/10 ratio should stay near 1; the weighted (EDF, bisect) and hashed (bisect) variants
are O(log n). The baseline row is a bare ``items[int(rng.random() * n)]`` measured in the
same run, the least any random pick can cost. Hash tables are built on the first pick; their
build time at 10,000 endpoints is printed separately.
"""

from __future__ import annotations

import functools
import gc
import random
import time
from collections.abc import Callable, Sequence

from inmesh.balancing import PickContext, StatsTable, build_balancer
from inmesh.config.model import (
    ConsistentHash,
    HeaderHashKey,
    LoadBalancerSettings,
    Maglev,
    RingHash,
    SimpleLB,
)
from inmesh.endpoints import Endpoint

SIZES = (10, 10_000)
PICKS = 20_000
REPEATS = 7
KEYS = [f"user-{i}".encode() for i in range(1_024)]


def make_endpoints(n: int, *, weighted: bool) -> list[Endpoint]:
    return [
        Endpoint(
            address=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            port=8080,
            weight=(1 + i % 3) if weighted else 1,
        )
        for i in range(n)
    ]


def simple(policy: SimpleLB) -> LoadBalancerSettings:
    return LoadBalancerSettings(simple=policy)


def hashed(table: RingHash | Maglev) -> LoadBalancerSettings:
    return LoadBalancerSettings(
        consistent_hash=ConsistentHash(key=HeaderHashKey("user"), table=table)
    )


CASES: list[tuple[str, LoadBalancerSettings | None, bool]] = [
    ("ROUND_ROBIN", simple(SimpleLB.ROUND_ROBIN), False),
    ("ROUND_ROBIN weighted (EDF)", simple(SimpleLB.ROUND_ROBIN), True),
    ("RANDOM", simple(SimpleLB.RANDOM), False),
    ("RANDOM weighted", simple(SimpleLB.RANDOM), True),
    ("LEAST_REQUEST (P2C)", simple(SimpleLB.LEAST_REQUEST), False),
    ("LEAST_REQUEST weighted (EDF)", simple(SimpleLB.LEAST_REQUEST), True),
    ("RING_HASH (min 1024)", hashed(RingHash()), False),
    ("MAGLEV (65537)", hashed(Maglev()), False),
]


def per_call_us(loops: Sequence[Callable[[int], None]]) -> list[float]:
    """Best of REPEATS runs of PICKS calls of each loop, in µs per call.

    The loops take turns within each repeat, so that a slow spell of the machine hits
    both sizes alike and the ratio between them stays meaningful.
    """
    best = [float("inf")] * len(loops)
    for _ in range(REPEATS):
        for i, loop in enumerate(loops):
            start = time.perf_counter_ns()
            loop(PICKS)
            best[i] = min(best[i], time.perf_counter_ns() - start)
    return [ns / PICKS / 1_000 for ns in best]


def pick_loop(
    settings: LoadBalancerSettings | None, n: int, *, weighted: bool
) -> Callable[[int], None]:
    stats = StatsTable()
    balancer = build_balancer(make_endpoints(n, weighted=weighted), settings, stats=stats)
    rng = random.Random(1234)
    contexts = [PickContext(rng=rng, hash_key=k) for k in KEYS]
    pick = balancer.pick
    for ctx in contexts * 2:  # warm-up, and builds the hash table
        pick(ctx)

    def loop(count: int) -> None:
        for i in range(count):
            pick(contexts[i & 1023])

    return loop


def baseline_loop(n: int) -> Callable[[int], None]:
    """The least a random pick can cost: one draw and one index, no balancer."""
    rng = random.Random(1234)
    items = list(range(n))

    def loop(count: int) -> None:
        draw = rng.random
        for _ in range(count):
            items[int(draw() * n)]

    return loop


def build_times(settings: LoadBalancerSettings | None, *, weighted: bool) -> tuple[float, float]:
    """(build_balancer, first pick) at 10,000 endpoints, best of 3, in milliseconds.

    Each build gets a fresh StatsTable, so least request pays for creating the figures
    of 10,000 endpoints; a rebuild after a config push reuses them.
    """
    eps = make_endpoints(10_000, weighted=weighted)
    best_build = best_first = float("inf")
    for _ in range(3):
        gc.collect()  # a collection of the earlier runs' garbage is not this build's cost
        start = time.perf_counter()
        balancer = build_balancer(eps, settings, stats=StatsTable())
        built = time.perf_counter()
        balancer.pick(PickContext(rng=random.Random(1234), hash_key=b"first"))
        picked = time.perf_counter()
        best_build = min(best_build, built - start)
        best_first = min(best_first, picked - built)
    return best_build * 1_000, best_first * 1_000


def main() -> None:
    header = f"{'policy':<30} {'µs/pick @10':>12} {'µs/pick @10k':>13} {'10k/10':>7}"
    print(header)
    print("-" * len(header))
    loops: list[tuple[str, Callable[[int], Callable[[int], None]]]] = [
        ("baseline int(rng.random()*n)", baseline_loop)
    ]
    loops += [
        (name, functools.partial(pick_loop, settings, weighted=weighted))
        for name, settings, weighted in CASES
    ]
    for name, make_loop in loops:
        small, large = per_call_us([make_loop(n) for n in SIZES])
        print(f"{name:<30} {small:>12.3f} {large:>13.3f} {large / small:>7.2f}")
    print()
    header = f"{'build at 10,000 endpoints':<30} {'build_balancer ms':>18} {'first pick ms':>14}"
    print(header)
    print("-" * len(header))
    for name, settings, weighted in CASES:
        build_ms, first_ms = build_times(settings, weighted=weighted)
        print(f"{name:<30} {build_ms:>18.1f} {first_ms:>14.1f}")


if __name__ == "__main__":
    main()
