"""Retry decisions: Envoy's retry_on table, Istio's plain codes, the jittered back-off, and
the one-tenacity-object-per-call rule.

Pure tests: the randomness is a seeded ``random.Random``; nothing sleeps.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from inmesh.config.model import DEFAULT_RETRY, HTTPRetry
from inmesh.resilience import retry as retry_module
from inmesh.resilience.retry import (
    GRPC_STATUS_NAMES,
    EnvoyJitter,
    Failure,
    Outcome,
    RetryState,
    retriable,
)

SEED = 2024

CONNECT = Outcome(failure=Failure.CONNECT)
RESET = Outcome(failure=Failure.RESET)
REFUSED = Outcome(failure=Failure.REFUSED_STREAM)
TIMEOUT = Outcome(failure=Failure.TIMEOUT)

OUTCOMES: dict[str, Outcome] = {
    "connect": CONNECT,
    "reset": RESET,
    "refused": REFUSED,
    "timeout": TIMEOUT,
    **{str(code): Outcome(status=code) for code in (200, 404, 409, 429, 500, 501, 502, 503, 504)},
    **{
        f"grpc:{name}": Outcome(status=200, grpc_status=name)
        for name in (
            "OK",
            "CANCELLED",
            "DEADLINE_EXCEEDED",
            "INTERNAL",
            "RESOURCE_EXHAUSTED",
            "UNAVAILABLE",
            "UNKNOWN",
        )
    },
}
TRANSPORT = {"connect", "reset", "refused", "timeout"}

# What each retryOn token retries, from Envoy's RetryStateImpl (wouldRetryFromHeaders and
# wouldRetryFromReset) and router (a per-try timeout is retried as a reset).
EXPECTED: dict[str, set[str]] = {
    "5xx": TRANSPORT | {"500", "501", "502", "503", "504"},
    "gateway-error": TRANSPORT | {"502", "503", "504"},
    "reset": TRANSPORT,
    "connect-failure": {"connect"},
    "refused-stream": {"refused"},
    "reset-before-request": {"connect"},
    "retriable-4xx": {"409"},
    "retriable-status-codes": set(),  # no codes listed in the policy
    "cancelled": {"grpc:CANCELLED"},
    "deadline-exceeded": {"grpc:DEADLINE_EXCEEDED"},
    "internal": {"grpc:INTERNAL"},
    "resource-exhausted": {"grpc:RESOURCE_EXHAUSTED"},
    "unavailable": {"grpc:UNAVAILABLE"},
    "envoy-ratelimited": set(),  # needs response headers inmesh does not look at
    "retriable-headers": set(),
    "http3-post-connect-failure": set(),
}


def policy(*tokens: str, codes: tuple[int, ...] = (), attempts: int = 2) -> HTTPRetry:
    return HTTPRetry(attempts=attempts, retry_on=tokens, retry_status_codes=codes)


# --------------------------------------------------------------------------- retry_on


@pytest.mark.parametrize("token", sorted(EXPECTED))
def test_each_retry_on_token_retries_exactly_its_outcomes(token: str) -> None:
    """Every token retries the outcomes Envoy's router retries for it, and nothing else."""
    rules = policy(token)
    retried = {name for name, outcome in OUTCOMES.items() if retriable(rules, outcome)}
    assert retried == EXPECTED[token]


def test_gateway_error_and_5xx_cover_every_transport_failure() -> None:
    """Envoy counts any upstream reset as a 5xx for both tokens (wouldRetryFromReset)."""
    for token in ("5xx", "gateway-error"):
        for failure in Failure:
            assert retriable(policy(token), Outcome(failure=failure)), (token, failure)


def test_per_try_timeout_is_retried_only_as_a_reset() -> None:
    """A per-try timeout resets the stream: 5xx, gateway-error and reset retry it; the
    narrower connect-failure and refused-stream do not."""
    retried = {token for token in EXPECTED if retriable(policy(token), TIMEOUT)}
    assert retried == {"5xx", "gateway-error", "reset"}


def test_plain_codes_retry_without_the_retriable_status_codes_token() -> None:
    """Istio adds retriable-status-codes for codes written in retryOn, so they apply anyway."""
    rules = policy("connect-failure", codes=(429, 503))
    assert retriable(rules, Outcome(status=429))
    assert retriable(rules, Outcome(status=503))
    assert not retriable(rules, Outcome(status=500))
    assert retriable(policy("retriable-status-codes", codes=(418,)), Outcome(status=418))


def test_tokens_combine_and_are_case_insensitive() -> None:
    """A policy retries the union of its tokens; token spelling is forgiven."""
    rules = policy("Connect-Failure", " retriable-4xx ", "UNAVAILABLE")
    assert retriable(rules, CONNECT)
    assert retriable(rules, Outcome(status=409))
    assert retriable(rules, Outcome(grpc_status="UNAVAILABLE"))
    assert not retriable(rules, RESET)
    assert not retriable(rules, Outcome(status=503))


def test_grpc_status_matches_by_name_or_code_number() -> None:
    """grpc-status is a number on the wire; the adapter may pass it either way."""
    rules = policy("unavailable", "cancelled")
    assert retriable(rules, Outcome(grpc_status="14"))
    assert retriable(rules, Outcome(grpc_status="unavailable"))
    assert retriable(rules, Outcome(grpc_status="1"))
    assert not retriable(rules, Outcome(grpc_status="13"))
    assert not retriable(rules, Outcome(grpc_status="0"))
    assert GRPC_STATUS_NAMES[14] == "UNAVAILABLE"


def test_istio_default_policy() -> None:
    """Istio's default: connect-failure, refused-stream, unavailable, cancelled and
    retriable-status-codes (with no codes) -- so no plain 503 retry."""
    assert retriable(DEFAULT_RETRY, CONNECT)
    assert retriable(DEFAULT_RETRY, REFUSED)
    assert retriable(DEFAULT_RETRY, Outcome(status=200, grpc_status="UNAVAILABLE"))
    assert retriable(DEFAULT_RETRY, Outcome(status=200, grpc_status="CANCELLED"))
    assert not retriable(DEFAULT_RETRY, RESET)
    assert not retriable(DEFAULT_RETRY, TIMEOUT)
    assert not retriable(DEFAULT_RETRY, Outcome(status=503))


def test_success_and_empty_outcomes_are_never_retried() -> None:
    """Nothing to retry when the attempt succeeded, whatever the policy."""
    everything = policy(*EXPECTED, codes=(503,))
    assert not retriable(everything, Outcome())
    assert not retriable(everything, Outcome(status=200, grpc_status="OK"))


def test_policy_tables_are_compiled_once() -> None:
    """The per-attempt check reuses the compiled table of an equal policy."""
    retry_module._rules.cache_clear()
    for _ in range(100):
        retriable(policy("5xx"), Outcome(status=503))
    info = retry_module._rules.cache_info()
    assert info.misses == 1
    assert info.hits == 99


# --------------------------------------------------------------------------- back-off


@pytest.mark.parametrize(
    ("n", "bound"), [(1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (5, 0.25), (6, 0.25)]
)
def test_jitter_range_for_each_retry(n: int, bound: float) -> None:
    """Retry n waits uniformly in [0, (2**n - 1) × 25 ms), the bound capped at 250 ms."""
    jitter = EnvoyJitter(random.Random(SEED))
    assert jitter.bound(n) == pytest.approx(bound)
    state = tenacity.RetryCallState(tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = n
    draws = [jitter(state) for _ in range(4000)]
    assert all(0 <= d < bound for d in draws)
    assert max(draws) > 0.98 * bound  # the whole range is used, not a fixed slice
    assert min(draws) < 0.02 * bound
    assert sum(draws) / len(draws) == pytest.approx(bound / 2, rel=0.05)


def test_jitter_with_custom_base_and_cap() -> None:
    """base and cap are parameters: 10 ms base, 50 ms cap."""
    jitter = EnvoyJitter(random.Random(SEED), base=0.01, cap=0.05)
    assert [jitter.bound(n) for n in range(1, 5)] == pytest.approx([0.01, 0.03, 0.05, 0.05])
    assert jitter.bound(10_000) == 0.05  # no overflow for absurd retry numbers
    assert jitter.bound(0) == 0.01  # and no zero-width range for a zero


def test_jitter_uses_only_the_given_generator() -> None:
    """Same seed, same waits; the global random generator is never touched."""
    before = random.getstate()
    first = RetryState(policy("5xx", attempts=5), random.Random(SEED))
    second = RetryState(policy("5xx", attempts=5), random.Random(SEED))
    waits = [first.next_backoff(RESET, attempt=a) for a in range(1, 6)]
    assert waits == [second.next_backoff(RESET, attempt=a) for a in range(1, 6)]
    assert random.getstate() == before


# --------------------------------------------------------------------------- RetryState


def test_attempts_count_retries_not_tries() -> None:
    """attempts=2 (Istio's meaning): two retries after the first try, then no more."""
    state = RetryState(policy("5xx", attempts=2), random.Random(SEED))
    first = state.next_backoff(Outcome(status=503), attempt=1)
    second = state.next_backoff(Outcome(status=503), attempt=2)
    assert first is not None
    assert 0 <= first < 0.025
    assert second is not None
    assert 0 <= second < 0.075
    assert state.next_backoff(Outcome(status=503), attempt=3) is None


def test_zero_attempts_never_retries() -> None:
    """attempts=0 turns retries off."""
    state = RetryState(policy("5xx", attempts=0), random.Random(SEED))
    assert state.next_backoff(CONNECT, attempt=1) is None


def test_non_retriable_outcome_gets_no_backoff() -> None:
    """An outcome retry_on does not cover ends the call whatever attempts are left."""
    state = RetryState(policy("connect-failure", attempts=5), random.Random(SEED))
    assert state.next_backoff(Outcome(status=503), attempt=1) is None
    assert state.next_backoff(CONNECT, attempt=1) is not None


def test_one_tenacity_retrying_per_retry_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call gets its own tenacity.Retrying, built once, configured as Envoy's policy,
    and never shared: tenacity's objects keep per-call statistics."""
    built: list[tenacity.Retrying] = []

    class Counting(tenacity.Retrying):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            built.append(self)

    monkeypatch.setattr(tenacity, "Retrying", Counting)
    rng = random.Random(SEED)
    first = RetryState(policy("5xx", attempts=3), rng)
    for attempt in range(1, 5):
        first.next_backoff(RESET, attempt=attempt)
    second = RetryState(policy("5xx", attempts=3), rng)
    assert built == [first.retrying, second.retrying]
    assert first.retrying is not second.retrying
    assert isinstance(first.retrying.wait, EnvoyJitter)
    assert isinstance(first.retrying.stop, tenacity.stop_after_attempt)
    assert first.retrying.stop.max_attempt_number == 4  # 3 retries = 4 tries


def test_tenacity_is_never_allowed_to_sleep() -> None:
    """The attempt loop waits; a tenacity sleep would block the event loop, so it raises."""
    state = RetryState(policy("5xx"), random.Random(SEED))
    with pytest.raises(RuntimeError, match="sleep"):
        state.retrying.sleep(0.1)


@given(
    tokens=st.sets(st.sampled_from(sorted(EXPECTED)), max_size=4),
    attempts=st.integers(0, 6),
    attempt=st.integers(1, 8),
    outcome=st.sampled_from(sorted(OUTCOMES)),
    seed=st.integers(0, 2**32),
)
def test_next_backoff_agrees_with_retriable_and_attempts(
    tokens: set[str], attempts: int, attempt: int, outcome: str, seed: int
) -> None:
    """A back-off comes exactly when the outcome is retriable and retries are left, and it
    lies within Envoy's jitter range for that retry."""
    rules = policy(*sorted(tokens), attempts=attempts)
    state = RetryState(rules, random.Random(seed))
    backoff = state.next_backoff(OUTCOMES[outcome], attempt=attempt)
    should = retriable(rules, OUTCOMES[outcome]) and attempt <= attempts
    assert (backoff is not None) == should
    if backoff is not None:
        assert 0 <= backoff < EnvoyJitter(random.Random(0)).bound(attempt)


# --------------------------------------------------------------------------- purity

RESILIENCE = Path(__file__).parent.parent / "src" / "inmesh" / "resilience"
FORBIDDEN = {"httpx", "httpcore", "grpc", "asyncio", "anyio", "trio", "time", "datetime"}


@pytest.mark.parametrize("path", sorted(RESILIENCE.glob("*.py")), ids=lambda p: p.name)
def test_core_modules_import_no_io_or_clock(path: Path) -> None:
    """The policy core imports no transport, event loop or clock, and calls no function of
    the global random generator (only ``random.Random`` as a type)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0]}
        else:
            names = set()
        assert not names & FORBIDDEN, (path.name, names)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
        ):
            assert node.attr == "Random", (path.name, node.attr)


def test_importing_the_core_loads_no_transport() -> None:
    """``import inmesh.resilience`` in a fresh interpreter pulls in no transport or loop."""
    code = (
        "import sys, inmesh.resilience\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'httpx', 'httpcore', 'grpc', 'asyncio', 'anyio'})\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == ""
