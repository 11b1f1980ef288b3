"""Load balancing: policies, consistent hashing, locality, health, and the load figures.

Pure tests: no servers, no mocks, no sleeps. Every random choice is seeded, and the
distribution checks use tolerances far wider than the seeded runs need, so a change of
algorithm fails them and chance cannot.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inmesh.balancing import Balancer, EndpointStats, PickContext, StatsTable, build_balancer
from inmesh.config.model import (
    ConsistentHash,
    Distribute,
    Failover,
    HeaderHashKey,
    LoadBalancerSettings,
    LocalityLbSetting,
    Maglev,
    RingHash,
    SimpleLB,
)
from inmesh.endpoints import Endpoint, EndpointKey, Locality

SEED = 1234

RR = LoadBalancerSettings(simple=SimpleLB.ROUND_ROBIN)
RANDOM = LoadBalancerSettings(simple=SimpleLB.RANDOM)
LEAST = LoadBalancerSettings(simple=SimpleLB.LEAST_REQUEST)
RING = LoadBalancerSettings(consistent_hash=ConsistentHash(key=HeaderHashKey("user")))
MAGLEV = LoadBalancerSettings(
    consistent_hash=ConsistentHash(key=HeaderHashKey("user"), table=Maglev())
)
SMALL_MAGLEV = LoadBalancerSettings(
    consistent_hash=ConsistentHash(key=HeaderHashKey("user"), table=Maglev(table_size=251))
)
ALL_POLICIES = [None, RR, RANDOM, LEAST, RING, SMALL_MAGLEV]
POLICY_IDS = ["default", "round_robin", "random", "least_request", "ring_hash", "maglev"]


def endpoint(
    name: str, *, weight: int = 1, locality: str = "", labels: Mapping[str, str] | None = None
) -> Endpoint:
    """An endpoint whose address is its name: picks read as names in assertions."""
    return Endpoint(
        address=name,
        port=80,
        weight=weight,
        locality=Locality.parse(locality),
        labels=dict(labels or {}),
    )


def endpoints(*names: str) -> list[Endpoint]:
    return [endpoint(name) for name in names]


def key(name: str) -> EndpointKey:
    return (name, 80)


def build(
    eps: Sequence[Endpoint],
    lb: LoadBalancerSettings | None = RR,
    *,
    stats: StatsTable | None = None,
    caller: str | None = None,
    failover: bool = False,
    unhealthy: Collection[str] = (),
    caller_labels: Mapping[str, str] | None = None,
) -> Balancer:
    return build_balancer(
        eps,
        lb,
        stats=stats if stats is not None else StatsTable(),
        caller_locality=Locality.parse(caller) if caller is not None else None,
        failover=failover,
        unhealthy=[key(name) for name in unhealthy],
        caller_labels=caller_labels or {},
    )


def pick(balancer: Balancer, ctx: PickContext) -> str:
    chosen = balancer.pick(ctx)
    assert chosen is not None
    return chosen.address


def sequence(balancer: Balancer, n: int, *, seed: int = SEED) -> list[str]:
    ctx = PickContext(rng=random.Random(seed))
    return [pick(balancer, ctx) for _ in range(n)]


def shares(balancer: Balancer, n: int, *, seed: int = SEED) -> Counter[str]:
    return Counter(sequence(balancer, n, seed=seed))


def hashed(balancer: Balancer, keys: Sequence[bytes], *, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [pick(balancer, PickContext(rng=rng, hash_key=k)) for k in keys]


KEYS = [f"user-{i}".encode() for i in range(10_000)]


# --------------------------------------------------------------------------- load figures


def test_endpoint_stats_counts_requests_in_flight() -> None:
    """begin() and end() move the active count; a stray end() cannot take it below zero."""
    stats = EndpointStats()
    stats.begin()
    stats.begin()
    stats.end()
    assert stats.active == 1
    stats.end()
    stats.end()
    assert stats.active == 0


def test_stats_table_creates_one_entry_per_key() -> None:
    """get() creates on first use and then returns the same object."""
    table = StatsTable()
    first = table.get(key("a"))
    assert table.get(key("a")) is first
    assert table.get(key("b")) is not first
    assert len(table) == 2


def test_stats_table_retain_forgets_only_idle_entries_not_kept() -> None:
    """retain() drops entries outside the kept keys unless they still have requests in flight."""
    table = StatsTable()
    table.get(key("kept"))
    table.get(key("gone"))
    busy = table.get(key("busy"))
    busy.begin()
    table.retain([key("kept")])
    assert key("kept") in table
    assert key("gone") not in table
    assert table.get(key("busy")) is busy  # still counted until its request ends


def test_stats_table_never_splits_a_key_that_a_balancer_still_holds() -> None:
    """A forgotten entry still held by a balancer is handed out again, so the counts it
    reads stay the ones the transport updates; an entry nobody holds is really gone."""
    table = StatsTable()
    balancer = build(endpoints("a", "b"), LEAST, stats=table)
    table.get(key("unused"))
    table.retain([])  # a snapshot without any of them
    assert len(table) == 0
    table.get(key("a")).begin()
    assert shares(balancer, 100) == {"b": 100}
    assert table.get(key("unused")).active == 0


def test_stats_are_thread_safe() -> None:
    """Threads hammering begin/end on shared endpoints end at exactly zero, one object per key."""
    table = StatsTable()
    keys = [key(f"e{i}") for i in range(4)]
    seen: list[set[int]] = [set() for _ in keys]
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(5_000):
            for i, k in enumerate(keys):
                stats = table.get(k)
                seen[i].add(id(stats))
                stats.begin()
            for k in keys:
                table.get(k).end()

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [table.get(k).active for k in keys] == [0, 0, 0, 0]
    assert all(len(ids) == 1 for ids in seen)


# --------------------------------------------------------------------------- common


@pytest.mark.parametrize("lb", ALL_POLICIES, ids=POLICY_IDS)
def test_no_endpoints_picks_none(lb: LoadBalancerSettings | None) -> None:
    """A balancer over nothing returns None and still describes itself."""
    balancer = build([], lb)
    assert balancer.pick(PickContext(rng=random.Random(SEED), hash_key=b"k")) is None
    assert balancer.endpoints == ()
    assert "over 0 endpoints" in balancer.describe()


@pytest.mark.parametrize("lb", ALL_POLICIES, ids=POLICY_IDS)
def test_single_endpoint_is_always_picked(lb: LoadBalancerSettings | None) -> None:
    """With one endpoint every policy picks it, with or without a hash key or exclusions."""
    balancer = build(endpoints("only"), lb)
    rng = random.Random(SEED)
    for ctx in (
        PickContext(rng=rng),
        PickContext(rng=rng, hash_key=b"k"),
        PickContext(rng=rng, exclude=[key("only")]),
    ):
        assert pick(balancer, ctx) == "only"


def test_default_policy_is_least_request() -> None:
    """No settings, or settings with neither simple nor consistentHash: LEAST_REQUEST (Istio)."""
    eps = endpoints("a", "b", "c")
    assert build(eps, None).describe() == "LEAST_REQUEST (power of two choices) over 3 endpoints"
    only_locality = LoadBalancerSettings(locality=LocalityLbSetting())
    assert build(eps, only_locality).describe().startswith("LEAST_REQUEST")


# --------------------------------------------------------------------------- round robin


def test_round_robin_rotates_in_order() -> None:
    """Equal weights: a plain rotation in the endpoints' order, without touching the rng."""
    balancer = build(endpoints("a", "b", "c"))
    assert sequence(balancer, 7) == ["a", "b", "c", "a", "b", "c", "a"]
    assert balancer.describe() == "ROUND_ROBIN over 3 endpoints"


def test_round_robin_is_exact_under_threads() -> None:
    """Four threads sharing one rotation still give each endpoint exactly its turn count."""
    balancer = build(endpoints("a", "b", "c"))
    picked: list[list[str]] = [[] for _ in range(4)]
    barrier = threading.Barrier(4)

    def work(out: list[str]) -> None:
        ctx = PickContext(rng=random.Random(SEED))
        barrier.wait()
        out.extend(pick(balancer, ctx) for _ in range(3_000))

    threads = [threading.Thread(target=work, args=(out,)) for out in picked]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(name for out in picked for name in out) == {"a": 4000, "b": 4000, "c": 4000}


def test_weighted_round_robin_follows_the_edf_schedule() -> None:
    """Weights 4:2:1 give Envoy's EDF order (ties to the earliest scheduled) and exact shares."""
    eps = [endpoint("a", weight=4), endpoint("b", weight=2), endpoint("c", weight=1)]
    balancer = build(eps)
    assert sequence(balancer, 7) == ["a", "b", "a", "a", "c", "b", "a"]
    assert shares(balancer, 700) == {"a": 400, "b": 200, "c": 100}
    assert balancer.describe() == "ROUND_ROBIN (weighted, EDF) over 3 endpoints"


def test_weighted_round_robin_three_to_one_spreads_picks() -> None:
    """3:1 is within one pick of exact, and interleaved: b's turns come round every ~4 picks
    (float ties may shift one), never in bursts of a's."""
    balancer = build([endpoint("a", weight=3), endpoint("b", weight=1)])
    picks = sequence(balancer, 4_000)
    assert abs(picks.count("a") - 3_000) <= 1
    assert "a" * 5 not in "".join(picks)


@settings(derandomize=True, database=None, deadline=None, max_examples=60)
@given(weights=st.lists(st.integers(1, 12), min_size=2, max_size=7), cycles=st.integers(1, 20))
def test_edf_shares_converge_to_weights(weights: list[int], cycles: int) -> None:
    """Property: after whole cycles of weighted round robin, each share is within one pick."""
    eps = [endpoint(f"e{i}", weight=w) for i, w in enumerate(weights)]
    counts = shares(build(eps), cycles * sum(weights))
    for i, w in enumerate(weights):
        assert abs(counts[f"e{i}"] - cycles * w) <= 1


# --------------------------------------------------------------------------- random


def test_random_is_uniform_and_reproducible() -> None:
    """Equal weights: uniform; the same seed gives the same sequence."""
    balancer = build(endpoints("a", "b", "c"), RANDOM)
    counts = shares(balancer, 9_000)
    assert all(2_700 <= counts[name] <= 3_300 for name in "abc")
    assert sequence(balancer, 50) == sequence(balancer, 50)
    assert balancer.describe() == "RANDOM over 3 endpoints"


def test_weighted_random_follows_weights() -> None:
    """3:1 weights: 75% ± 3 points over 10,000 seeded picks."""
    balancer = build([endpoint("a", weight=3), endpoint("b", weight=1)], RANDOM)
    assert 7_200 <= shares(balancer, 10_000)["a"] <= 7_800
    assert balancer.describe() == "RANDOM (weighted) over 2 endpoints"


# --------------------------------------------------------------------------- least request


def test_power_of_two_choices_never_picks_the_busier_of_two() -> None:
    """Two endpoints: both are always drawn (distinct), so the busier one is never chosen."""
    stats = StatsTable()
    stats.get(key("a")).begin()
    balancer = build(endpoints("a", "b"), LEAST, stats=stats)
    assert shares(balancer, 1_000) == {"b": 1_000}


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    """Active 5/3/0: the busiest never wins a draw, the idle one wins the 2 draws in 3 it is in."""
    stats = StatsTable()
    for name, active in (("a", 5), ("b", 3)):
        for _ in range(active):
            stats.get(key(name)).begin()
    balancer = build(endpoints("a", "b", "c"), LEAST, stats=stats)
    counts = shares(balancer, 10_000)
    assert counts["a"] == 0
    assert 6_367 <= counts["c"] <= 6_967
    assert balancer.describe() == "LEAST_REQUEST (power of two choices) over 3 endpoints"


def test_weighted_least_request_shifts_away_from_loaded_endpoints() -> None:
    """Unequal weights: EDF on weight/(active+1), re-weighed whenever an endpoint is rescheduled."""
    stats = StatsTable()
    eps = [endpoint("a", weight=2), endpoint("b", weight=1), endpoint("c", weight=1)]
    balancer = build(eps, LEAST, stats=stats)
    assert shares(balancer, 1_000) == {"a": 500, "b": 250, "c": 250}
    for _ in range(9):
        stats.get(key("a")).begin()  # a: 2/10 against 1 and 1
    sequence(balancer, 10)  # a's pending deadline was set while idle; let it come round
    counts = shares(balancer, 2_200)
    assert counts["a"] <= 250  # ~9% (200) instead of 50%
    assert "weight/(active+1)" in balancer.describe()


# --------------------------------------------------------------------------- consistent hash


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_consistent_hash_same_key_same_endpoint(lb: LoadBalancerSettings) -> None:
    """A key always maps to the same endpoint, in one balancer and in one built independently
    from the endpoints listed in another order."""
    eps = endpoints(*(f"10.0.0.{i}" for i in range(8)))
    first = hashed(build(eps, lb), KEYS[:500])
    assert hashed(build(eps, lb), KEYS[:500], seed=99) == first
    assert hashed(build(eps[::-1], lb), KEYS[:500]) == first
    assert len(set(first)) == 8


def test_consistent_hash_is_the_same_in_another_process() -> None:
    """The tables use a stable hash, not Python's salted hash(): another process agrees."""
    script = """
import json, random, sys
from inmesh.balancing import PickContext, StatsTable, build_balancer
from inmesh.config.model import ConsistentHash, HeaderHashKey, LoadBalancerSettings
from inmesh.config.model import Maglev, RingHash
from inmesh.endpoints import Endpoint
eps = [Endpoint(address=f"10.0.0.{i}", port=80) for i in range(8)]
out = []
for table in (RingHash(), Maglev()):
    ch = ConsistentHash(key=HeaderHashKey("user"), table=table)
    b = build_balancer(eps, LoadBalancerSettings(consistent_hash=ch), stats=StatsTable())
    rng = random.Random(0)
    keys = [f"user-{i}".encode() for i in range(200)]
    out.append([b.pick(PickContext(rng=rng, hash_key=k)).address for k in keys])
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    eps = endpoints(*(f"10.0.0.{i}" for i in range(8)))
    here = [hashed(build(eps, lb), KEYS[:200]) for lb in (RING, MAGLEV)]
    assert json.loads(result.stdout) == here


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_consistent_hash_adding_an_endpoint_moves_a_minority(lb: LoadBalancerSettings) -> None:
    """Going from 10 to 11 endpoints moves about 1/11 of the keys, far from a reshuffle."""
    eps = endpoints(*(f"10.0.0.{i}" for i in range(10)))
    before = hashed(build(eps, lb), KEYS[:5_000])
    after = hashed(build([*eps, endpoint("10.0.0.99")], lb), KEYS[:5_000])
    moved = sum(b != a for b, a in zip(before, after, strict=True)) / len(before)
    assert 0.05 < moved < 0.25
    assert after.count("10.0.0.99") > 250


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_consistent_hash_follows_weights(lb: LoadBalancerSettings) -> None:
    """3:1 weights: the heavier endpoint owns ~75% of the key space (± 5 points)."""
    counts = Counter(hashed(build([endpoint("a", weight=3), endpoint("b")], lb), KEYS))
    assert 7_000 <= counts["a"] <= 8_000


def test_maglev_table_size_is_respected() -> None:
    """A small prime table works, even with more endpoints than the typical guidance."""
    small = LoadBalancerSettings(
        consistent_hash=ConsistentHash(key=HeaderHashKey("user"), table=Maglev(table_size=13))
    )
    balancer = build(endpoints(*(f"e{i}" for i in range(5))), small)
    assert set(hashed(balancer, KEYS[:1_000])) == {f"e{i}" for i in range(5)}
    assert balancer.describe() == "MAGLEV (table size 13) on header user over 5 endpoints"


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_consistent_hash_without_key_picks_at_random(lb: LoadBalancerSettings) -> None:
    """hash_key None under a hash policy: a random pick (as Envoy), spread over all endpoints."""
    balancer = build(endpoints("a", "b", "c"), lb)
    counts = shares(balancer, 3_000)
    assert all(counts[name] > 600 for name in "abc")
    assert sequence(balancer, 30, seed=1) != sequence(balancer, 30, seed=2)


def test_ring_hash_describe_names_the_key() -> None:
    """describe() says which table and which request attribute feeds the hash."""
    ring = LoadBalancerSettings(
        consistent_hash=ConsistentHash(key=HeaderHashKey("x-user"), table=RingHash(2048))
    )
    text = build(endpoints("a", "b"), ring).describe()
    assert text == "RING_HASH (minimum ring size 2048) on header x-user over 2 endpoints"


# --------------------------------------------------------------------------- exclude (retries)


def test_exclude_skips_endpoints_already_tried() -> None:
    """Round robin with b tried: every turn that lands on b moves on to c."""
    balancer = build(endpoints("a", "b", "c"))
    ctx = PickContext(rng=random.Random(SEED), exclude=[key("b")])
    assert [pick(balancer, ctx) for _ in range(4)] == ["a", "c", "a", "c"]


def test_exclude_re_picks_at_most_five_times() -> None:
    """With nearly everything tried, a pick gives up after 1 + 5 turns and takes the last one."""
    names = [f"e{i}" for i in range(10)]
    balancer = build(endpoints(*names))
    rng = random.Random(SEED)
    tried = [key(name) for name in names[:9]]
    assert pick(balancer, PickContext(rng=rng, exclude=tried)) == "e5"  # turns e0..e5
    assert pick(balancer, PickContext(rng=rng)) == "e6"


def test_exclude_makes_random_avoid_the_tried_endpoint() -> None:
    """Random over two: a tried endpoint comes back only when six draws all hit it (1 in 64)."""
    balancer = build(endpoints("a", "b"), RANDOM)
    ctx = PickContext(rng=random.Random(SEED), exclude=[key("a")])
    counts = Counter(pick(balancer, ctx) for _ in range(6_400))
    assert counts["a"] <= 200


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_exclude_moves_a_hashed_key_to_another_endpoint(lb: LoadBalancerSettings) -> None:
    """A retry of a hashed request walks on (next ring point, perturbed Maglev slot)."""
    balancer = build(endpoints("a", "b", "c"), lb)
    rng = random.Random(SEED)
    moved = 0
    for k in KEYS[:200]:
        first = balancer.pick(PickContext(rng=rng, hash_key=k))
        assert first is not None
        retry = balancer.pick(PickContext(rng=rng, hash_key=k, exclude=[first.key]))
        assert retry is not None
        moved += retry != first
        again = balancer.pick(PickContext(rng=rng, hash_key=k, exclude=[first.key]))
        assert again == retry  # still deterministic per key
    assert moved >= 195


def test_exclude_everything_still_returns_an_endpoint() -> None:
    """When every endpoint was tried, a pick still returns one (the retry goes somewhere)."""
    for lb in ALL_POLICIES:
        balancer = build(endpoints("a", "b"), lb)
        ctx = PickContext(rng=random.Random(SEED), hash_key=b"k", exclude=[key("a"), key("b")])
        assert pick(balancer, ctx) in {"a", "b"}


# --------------------------------------------------------------------------- health


def test_unhealthy_endpoints_are_skipped_until_all_are() -> None:
    """Without failover, unhealthy endpoints leave the pick set; all unhealthy: panic, use all."""
    eps = endpoints("a", "b", "c")
    assert set(shares(build(eps, RANDOM, unhealthy=["b"]), 1_000)) == {"a", "c"}
    panicked = build(eps, RANDOM, unhealthy=["a", "b", "c"])
    assert set(shares(panicked, 1_000)) == {"a", "b", "c"}
    assert "panic" in panicked.describe()
    assert build(eps, RANDOM, unhealthy=["b"]).describe() == (
        "RANDOM over 3 endpoints; 1 of 3 unhealthy"
    )


# --------------------------------------------------------------------------- locality: distribute

WEST1 = "us-west/zone1/sz"
DISTRIBUTED = [
    endpoint("w1a", locality=WEST1),
    endpoint("w1b", locality=WEST1),
    endpoint("w2", locality="us-west/zone2/sz"),
    endpoint("e1", locality="us-east/zone1/sz"),
]


def distribute(
    *to: tuple[str, int], from_: str = "us-west/zone1/*", simple: SimpleLB = SimpleLB.ROUND_ROBIN
) -> LoadBalancerSettings:
    rule = Distribute(from_=from_, to=to)
    return LoadBalancerSettings(simple=simple, locality=LocalityLbSetting(distribute=(rule,)))


def test_distribute_splits_traffic_by_locality_weight() -> None:
    """80/20 between two zones; the locality no `to` entry names gets nothing and is out of play."""
    lb = distribute(("us-west/zone1/*", 80), ("us-west/zone2/*", 20))
    balancer = build(DISTRIBUTED, lb, caller=WEST1)
    assert shares(balancer, 1_000) == {"w1a": 400, "w1b": 400, "w2": 200}
    assert [ep.address for ep in balancer.endpoints] == ["w1a", "w1b", "w2"]
    assert balancer.describe() == (
        "ROUND_ROBIN over 3 endpoints; locality distribute from us-west/zone1/*: "
        "us-west/zone1/sz 80 (2), us-west/zone2/sz 20 (1)"
    )


def test_distribute_wildcard_shares_weight_by_locality_size() -> None:
    """`us-west/*: 100` matches two zones, which split it 2:1 by endpoint weight (67 and 34)."""
    balancer = build(DISTRIBUTED, distribute(("us-west/*", 100)), caller=WEST1)
    counts = shares(balancer, 10_100)
    assert abs(counts["w1a"] + counts["w1b"] - 6_700) <= 2
    assert abs(counts["w2"] - 3_400) <= 2
    assert counts["e1"] == 0


def test_distribute_applies_only_when_from_matches_the_caller() -> None:
    """A caller in another region is not covered by the rule: plain balancing over all."""
    lb = distribute(("us-west/zone1/*", 80), ("us-west/zone2/*", 20))
    balancer = build(DISTRIBUTED, lb, caller="eu-west/zone1")
    assert shares(balancer, 400) == {"w1a": 100, "w1b": 100, "w2": 100, "e1": 100}


def test_distribute_scales_a_locality_by_its_health() -> None:
    """Half of zone1 ejected: its weight becomes 80 × min(1, 1.4 × 0.5) = 56 against 20."""
    lb = distribute(("us-west/zone1/*", 80), ("us-west/zone2/*", 20))
    balancer = build(DISTRIBUTED, lb, caller=WEST1, unhealthy=["w1a"])
    counts = shares(balancer, 7_600)
    assert counts["w1a"] == 0
    assert abs(counts["w1b"] - 5_600) <= 2
    assert abs(counts["w2"] - 2_000) <= 2
    gone = build(DISTRIBUTED, lb, caller=WEST1, unhealthy=["w1a", "w1b"])
    assert shares(gone, 100) == {"w2": 100}


def test_distribute_with_consistent_hash_folds_locality_into_the_table() -> None:
    """A hash policy cannot pick a locality first: the table itself is weighted 80/20."""
    rule = Distribute(
        from_="us-west/zone1/*", to=(("us-west/zone1/*", 80), ("us-west/zone2/*", 20))
    )
    lb = LoadBalancerSettings(
        consistent_hash=ConsistentHash(key=HeaderHashKey("user"), table=Maglev()),
        locality=LocalityLbSetting(distribute=(rule,)),
    )
    counts = Counter(hashed(build(DISTRIBUTED, lb, caller=WEST1), KEYS))
    assert 7_500 <= counts["w1a"] + counts["w1b"] <= 8_500
    assert counts["e1"] == 0


def test_no_caller_locality_means_no_locality_awareness() -> None:
    """An unknown caller locality turns distribute and locality failover off."""
    lb = distribute(("us-west/zone1/*", 100))
    assert len(shares(build(DISTRIBUTED, lb), 400)) == 4
    assert len(shares(build(DISTRIBUTED, RR, failover=True, caller=""), 400)) == 4


# --------------------------------------------------------------------------- locality: failover

FAILOVER_EPS = [
    endpoint("p0a", locality="us-west/zone1/a"),
    endpoint("p0b", locality="us-west/zone1/a"),
    endpoint("p1", locality="us-west/zone1/b"),
    endpoint("p2", locality="us-west/zone2/a"),
    endpoint("p3", locality="us-east/zone1/a"),
]
CALLER = "us-west/zone1/a"


def test_failover_sends_everything_to_the_closest_healthy_level() -> None:
    """All healthy: only P0 (same region, zone and subzone) gets traffic."""
    balancer = build(FAILOVER_EPS, RR, caller=CALLER, failover=True)
    assert shares(balancer, 100) == {"p0a": 50, "p0b": 50}
    assert balancer.describe() == (
        "ROUND_ROBIN over 5 endpoints; locality P0 us-west/zone1/a (2), "
        "P1 us-west/zone1/b (1), P2 us-west/zone2/a (1), P3 us-east/zone1/a (1)"
    )


def test_failover_spills_over_with_the_overprovisioning_factor() -> None:
    """P0 half healthy keeps min(100, 1.4 × 50) = 70% and spills 30% to P1."""
    balancer = build(FAILOVER_EPS, RR, caller=CALLER, failover=True, unhealthy=["p0a"])
    counts = shares(balancer, 10_000)
    assert counts["p0a"] == 0
    assert 6_700 <= counts["p0b"] <= 7_300
    assert 2_700 <= counts["p1"] <= 3_300
    assert "load P0 70%, P1 30%, P2 0%, P3 0%" in balancer.describe()


def test_failover_moves_on_when_a_level_is_down() -> None:
    """P0 entirely unhealthy: P1 takes all of it; then P2, then P3."""
    down: list[str] = []
    for name, level in (("p0a", None), ("p0b", "p1"), ("p1", "p2"), ("p2", "p3")):
        down.append(name)
        if level is not None:
            balancer = build(FAILOVER_EPS, RR, caller=CALLER, failover=True, unhealthy=down)
            assert shares(balancer, 50) == {level: 50}


def test_failover_panic_balances_over_everything() -> None:
    """Nothing healthy anywhere: Envoy's total panic, load by host count over all endpoints."""
    everything = [ep.address for ep in FAILOVER_EPS]
    balancer = build(FAILOVER_EPS, RR, caller=CALLER, failover=True, unhealthy=everything)
    counts = shares(balancer, 10_000)
    assert all(1_700 <= counts[name] <= 2_300 for name in everything)
    assert balancer.describe().endswith(
        "5 of 5 unhealthy; panic: no healthy endpoint, balancing over all"
    )


def test_failover_needs_outlier_detection_and_locality_lb_enabled() -> None:
    """failover=False (no outlierDetection) or enabled=False: no priority levels at all."""
    assert len(shares(build(FAILOVER_EPS, RR, caller=CALLER), 500)) == 5
    off = LoadBalancerSettings(
        simple=SimpleLB.ROUND_ROBIN, locality=LocalityLbSetting(enabled=False)
    )
    assert len(shares(build(FAILOVER_EPS, off, caller=CALLER, failover=True), 500)) == 5


def test_failover_region_rule_ranks_the_target_region_next() -> None:
    """failover us-west -> eu-west: with us-west down, eu-west is next, us-east after it."""
    eps = [
        endpoint("west", locality="us-west/zone1"),
        endpoint("east", locality="us-east/zone1"),
        endpoint("eu", locality="eu-west/zone1"),
    ]
    rule = Failover(from_="us-west", to="eu-west")
    lb = LoadBalancerSettings(
        simple=SimpleLB.ROUND_ROBIN, locality=LocalityLbSetting(failover=(rule,))
    )
    balancer = build(eps, lb, caller="us-west/zone1", failover=True, unhealthy=["west"])
    assert shares(balancer, 100) == {"eu": 100}
    plain = build(eps, RR, caller="us-west/zone1", failover=True, unhealthy=["west"])
    assert shares(plain, 100) == {"east": 50, "eu": 50}


def test_failover_priority_ranks_by_leading_matching_labels() -> None:
    """failoverPriority [net, version=v2]: net and v2 first, then same net, then the rest."""
    eps = [
        endpoint("best", labels={"net": "n1", "version": "v2"}),
        endpoint("same-net", labels={"net": "n1", "version": "v1"}),
        endpoint("other", labels={"net": "n2", "version": "v2"}),
    ]
    lb = LoadBalancerSettings(
        simple=SimpleLB.ROUND_ROBIN,
        locality=LocalityLbSetting(failover_priority=("net", "version=v2")),
    )
    labels = {"net": "n1", "version": "v1"}  # "version=v2" overrides the caller's own v1
    down: list[str] = []
    for expected in ("best", "same-net", "other"):
        balancer = build(eps, lb, failover=True, caller_labels=labels, unhealthy=down)
        assert shares(balancer, 20) == {expected: 20}
        down.append(expected)


def test_failover_priority_can_name_topology_labels_from_the_locality() -> None:
    """Istio's topology labels come from the locality, for the caller and for endpoints alike."""
    eps = [
        endpoint("other-region", locality="us-east/zone1"),
        endpoint("same-region", locality="us-west/zone2"),
        endpoint("same-zone", locality="us-west/zone1"),
    ]
    lb = LoadBalancerSettings(
        simple=SimpleLB.ROUND_ROBIN,
        locality=LocalityLbSetting(
            failover_priority=("topology.kubernetes.io/region", "topology.kubernetes.io/zone")
        ),
    )
    balancer = build(eps, lb, caller="us-west/zone1", failover=True)
    assert shares(balancer, 10) == {"same-zone": 10}
    assert "P0 us-west/zone1 (1), P1 us-west/zone2 (1), P2 us-east/zone1 (1)" in (
        balancer.describe()
    )
    balancer = build(eps, lb, caller="us-west/zone1", failover=True, unhealthy=["same-zone"])
    assert shares(balancer, 10) == {"same-region": 10}


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring_hash", "maglev"])
def test_consistent_hash_respects_priority_levels(lb: LoadBalancerSettings) -> None:
    """A hash policy behind failover hashes into the healthy closest level only."""
    balancer = build(FAILOVER_EPS, lb, caller=CALLER, failover=True, unhealthy=["p0a", "p0b"])
    assert set(hashed(balancer, KEYS[:1_000])) == {"p1"}


# --------------------------------------------------------------------------- properties

LOCALITIES = ["", "us-west/zone1/a", "us-west/zone1/b", "us-west/zone2", "us-east/zone1"]
LB_CHOICES = [
    *ALL_POLICIES,
    LoadBalancerSettings(
        simple=SimpleLB.RANDOM,
        locality=LocalityLbSetting(
            distribute=(Distribute(from_="us-west/*", to=(("us-west/zone1/*", 70), ("*", 30))),)
        ),
    ),
    LoadBalancerSettings(
        consistent_hash=ConsistentHash(key=HeaderHashKey("u"), table=RingHash(64)),
        locality=LocalityLbSetting(failover=(Failover(from_="us-west", to="us-east"),)),
    ),
]


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Endpoint], set[str], Balancer, list[PickContext]]:
    count = draw(st.integers(1, 8))
    eps = [
        endpoint(
            f"e{i}",
            weight=draw(st.integers(1, 5)),
            locality=draw(st.sampled_from(LOCALITIES)),
            labels={"net": draw(st.sampled_from(["n1", "n2"]))},
        )
        for i in range(count)
    ]
    unhealthy = draw(st.sets(st.sampled_from([ep.address for ep in eps])))
    balancer = build(
        eps,
        draw(st.sampled_from(LB_CHOICES)),
        caller=draw(st.sampled_from([None, *LOCALITIES])),
        failover=draw(st.booleans()),
        unhealthy=unhealthy,
        caller_labels=draw(st.sampled_from([{}, {"net": "n1"}])),
    )
    # The contexts come from a drawn seed: as reproducible, and much cheaper than drawing each.
    rng = random.Random(draw(st.integers(0, 2**32)))
    contexts = [
        PickContext(
            rng=rng,
            hash_key=rng.randbytes(rng.randrange(8)) if rng.random() < 0.8 else None,
            exclude=[ep.key for ep in eps if rng.random() < 0.3],
        )
        for _ in range(20)
    ]
    return eps, unhealthy, balancer, contexts


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(scenario=scenarios())
def test_pick_returns_an_endpoint_in_play_and_healthy_unless_panicking(
    scenario: tuple[list[Endpoint], set[str], Balancer, list[PickContext]],
) -> None:
    """Property: a pick is one of the balancer's endpoints, which are among the given ones;
    it is healthy whenever any endpoint in play is healthy; and describe() is one line."""
    eps, unhealthy, balancer, contexts = scenario
    assert set(balancer.endpoints) <= set(eps)
    in_play = {ep.address for ep in balancer.endpoints}
    any_healthy = bool(in_play - unhealthy)
    for ctx in contexts:
        chosen = balancer.pick(ctx)
        if not in_play:
            assert chosen is None
            continue
        assert chosen is not None
        assert chosen.address in in_play
        if any_healthy:
            assert chosen.address not in unhealthy
    assert "\n" not in balancer.describe()
