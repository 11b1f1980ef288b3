"""The circuit breaker for arbitrary calls: pybreaker's state machine, without its limits.

Time never passes by sleeping: a test that needs the reset timeout over moves the
``opened_at`` stamp in the (memory) state storage into the past, which is exactly what
pybreaker compares with the wall clock. One test lets a tiny real timeout run out, waited
for with a deadline.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pybreaker
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inmesh.exceptions import MeshError
from inmesh.resilience.breaker import _ENTERED, Breaker, CircuitOpenError

WAIT = 5.0  # seconds: the most any condition below may take to come true


class Boom(Exception):
    """The failure of a guarded call."""


class NotFound(Exception):
    """A business error: the service answered."""


def storage() -> pybreaker.CircuitMemoryStorage:
    return pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)


def expire(store: pybreaker.CircuitBreakerStorage, seconds: float = 3600.0) -> None:
    """Let ``seconds`` pass for the open breaker on ``store``: move its opened_at back."""
    opened_at = store.opened_at
    assert opened_at is not None
    store.opened_at = opened_at - timedelta(seconds=seconds)


def ok() -> str:
    return "ok"


def boom() -> None:
    raise Boom("down")


def raising(exc: BaseException) -> Callable[[], None]:
    def raise_it() -> None:
        raise exc

    return raise_it


def trip(breaker: Breaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            breaker.call(boom)


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Recorder(pybreaker.CircuitBreakerListener):
    """A pybreaker listener that writes down every event."""

    def __init__(self) -> None:
        self.events: list[tuple[str, ...]] = []

    def before_call(
        self, cb: pybreaker.CircuitBreaker, func: Any, *args: Any, **kwargs: Any
    ) -> None:
        self.events.append(("before_call", getattr(func, "__name__", "?")))

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        self.events.append(("failure", type(exc).__name__))

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        self.events.append(("success",))

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self.events.append(("state_change", old_state.name if old_state else "-", new_state.name))


@pytest.fixture
def store() -> pybreaker.CircuitMemoryStorage:
    """A fresh in-memory state storage the test can reach into."""
    return storage()


@pytest.fixture
def breaker(store: pybreaker.CircuitMemoryStorage) -> Iterator[Breaker]:
    """A breaker on ``store`` that opens after three failures, for 30 s."""
    yield Breaker("payments", fail_max=3, reset_timeout=30.0, state_storage=store)
    assert _ENTERED.get() == ()


# --------------------------------------------------------------------------- closed / open


def test_opens_after_fail_max_consecutive_failures(breaker: Breaker) -> None:
    """Failures are counted while closed, a success resets the count, and the fail_max-th
    consecutive failure opens the breaker; that caller still gets its own error."""
    trip(breaker, 2)
    assert (breaker.state, breaker.fail_counter) == ("closed", 2)
    assert breaker.call(ok) == "ok"
    assert breaker.fail_counter == 0
    trip(breaker, 2)
    assert breaker.state == "closed"
    with pytest.raises(Boom):
        breaker.call(boom)
    assert (breaker.state, breaker.fail_counter) == ("open", 3)


def test_open_breaker_refuses_without_calling(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage
) -> None:
    """An open breaker raises CircuitOpenError, which names it and says when it will try
    again, and never calls the function."""
    trip(breaker, 3)
    called: list[int] = []
    with pytest.raises(CircuitOpenError) as refused:
        breaker.call(called.append, 1)
    assert called == []
    error = refused.value
    assert isinstance(error, MeshError)
    assert isinstance(error, pybreaker.CircuitBreakerError)
    assert error.breaker == "payments"
    assert store.opened_at is not None
    assert error.retry_at == pytest.approx(store.opened_at.timestamp() + 30.0)
    assert "'payments' is open" in str(error)
    assert "lets a trial call through at 20" in str(error)  # an ISO date follows
    assert (breaker.state, breaker.fail_counter) == ("open", 3)


def test_circuit_open_error_survives_pickling(breaker: Breaker) -> None:
    """CircuitOpenError crosses process boundaries with its message and fields."""
    breaker.open()
    with pytest.raises(CircuitOpenError) as refused:
        breaker.call(ok)
    copy = pickle.loads(pickle.dumps(refused.value))
    assert (str(copy), copy.breaker, copy.retry_at) == (
        str(refused.value),
        "payments",
        refused.value.retry_at,
    )


# --------------------------------------------------------------------------- half-open


def test_trial_success_closes(breaker: Breaker, store: pybreaker.CircuitMemoryStorage) -> None:
    """After the reset timeout the next call is the trial; its success closes the breaker
    and resets the failure count."""
    trip(breaker, 3)
    expire(store)
    assert breaker.call(ok) == "ok"
    assert (breaker.state, breaker.fail_counter) == ("closed", 0)


def test_trial_failure_reopens(breaker: Breaker, store: pybreaker.CircuitMemoryStorage) -> None:
    """A failed trial opens the breaker again for a whole new reset timeout."""
    trip(breaker, 3)
    expire(store)
    with pytest.raises(Boom):
        breaker.call(boom)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    expire(store)
    assert breaker.call(ok) == "ok"
    assert breaker.state == "closed"


def test_half_open_admits_one_trial_among_racing_threads(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage
) -> None:
    """Sixteen threads race for a half-open breaker: exactly one call runs, the others are
    refused while it is under way, and its success closes the breaker."""
    trip(breaker, 3)
    expire(store)
    n = 16
    start = threading.Barrier(n)
    release = threading.Event()
    ran: list[int] = []
    refused: list[CircuitOpenError] = []

    def trial() -> str:
        ran.append(threading.get_ident())
        assert release.wait(WAIT)
        return "ok"

    def racer() -> None:
        start.wait(WAIT)
        try:
            breaker.call(trial)
        except CircuitOpenError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=racer) for _ in range(n)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(refused) == n - 1, "the other callers to be refused")
    assert len(ran) == 1
    assert all(exc.retry_at is None and "trial call is under way" in str(exc) for exc in refused)
    release.set()
    for thread in threads:
        thread.join(WAIT)
    assert len(ran) == 1
    assert breaker.state == "closed"


def test_half_open_admits_one_trial_among_racing_tasks(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage
) -> None:
    """Sixteen asyncio tasks race for a half-open breaker: one trial runs, fifteen are
    refused, and the trial's failure opens the breaker again."""
    trip(breaker, 3)
    expire(store)
    n = 16

    async def main() -> list[object]:
        release = asyncio.Event()
        all_refused = asyncio.Event()
        ran = 0
        refused = 0

        async def trial() -> None:
            nonlocal ran
            ran += 1
            await release.wait()
            raise Boom("still down")

        async def racer() -> None:
            nonlocal refused
            try:
                await breaker.call_async(trial)
            except CircuitOpenError:
                refused += 1
                if refused == n - 1:
                    all_refused.set()
                raise

        async with asyncio.timeout(WAIT):
            tasks = [asyncio.create_task(racer()) for _ in range(n)]
            await all_refused.wait()
            assert ran == 1
            release.set()
            return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert sorted(type(o).__name__ for o in outcomes) == ["Boom"] + ["CircuitOpenError"] * 15
    assert breaker.state == "open"


def test_outcome_of_a_call_from_an_older_state_is_ignored(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage
) -> None:
    """A call admitted while closed that ends during a half-open trial decides nothing,
    whether it failed or succeeded: only the trial does."""
    for outcome in (boom, ok):
        old = Gated(breaker, outcome)
        assert old.entered.wait(WAIT)
        breaker.open()
        expire(store)
        trial = Gated(breaker, ok)
        assert trial.entered.wait(WAIT)
        old.finish()
        assert breaker.state == "half-open"
        with pytest.raises(CircuitOpenError):  # the trial is still the trial
            breaker.call(ok)
        trial.finish()
        assert (breaker.state, breaker.fail_counter) == ("closed", 0)


class Gated:
    """A guarded call in its own thread that, once inside, waits to be let finish."""

    def __init__(self, breaker: Breaker, outcome: Callable[[], object]) -> None:
        self.entered = threading.Event()
        self._go = threading.Event()
        self._outcome = outcome
        self._thread = threading.Thread(target=self._run, args=(breaker,))
        self._thread.start()

    def _run(self, breaker: Breaker) -> None:
        with contextlib.suppress(Boom):
            breaker.call(self._inside)

    def _inside(self) -> object:
        self.entered.set()
        assert self._go.wait(WAIT)
        return self._outcome()

    def finish(self) -> None:
        self._go.set()
        self._thread.join(WAIT)


# --------------------------------------------------------------------------- concurrency


def test_sync_callers_are_not_serialized(breaker: Breaker) -> None:
    """Two threads are inside guarded calls at the same time: the breaker's lock is not
    held across the call, as pybreaker's call() holds it."""
    both_inside = threading.Barrier(2)
    results: list[int] = []

    def meet() -> int:
        return both_inside.wait(WAIT)  # BrokenBarrierError if the other thread cannot enter

    threads = [
        threading.Thread(target=lambda: results.append(breaker.call(meet))) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert sorted(results) == [0, 1]
    assert breaker.fail_counter == 0


def test_async_call_holds_no_lock_across_await(breaker: Breaker) -> None:
    """While a task awaits inside a guarded call, another task and another thread both
    complete guarded calls of their own."""

    async def main() -> list[object]:
        inside = asyncio.Event()
        release = asyncio.Event()

        async def slow() -> str:
            inside.set()
            await release.wait()
            return "slow"

        async def quick() -> str:
            return "quick"

        async with asyncio.timeout(WAIT):
            first = asyncio.create_task(breaker.call_async(slow))
            await inside.wait()
            other_task = await breaker.call_async(quick)
            other_thread = await asyncio.to_thread(breaker.call, ok)
            release.set()
            return [await first, other_task, other_thread]

    assert asyncio.run(main()) == ["slow", "quick", "ok"]


# --------------------------------------------------------------------------- cancellation


def test_cancelled_task_is_no_failure_and_frees_the_trial(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage
) -> None:
    """A task cancelled inside a guarded call leaves the failure count alone while closed
    (no failure, no success either), and releases a half-open trial for the next caller."""

    async def cancel_inside() -> None:
        entered = asyncio.Event()

        async def hang() -> None:
            entered.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(breaker.call_async(hang))
        async with asyncio.timeout(WAIT):
            await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    trip(breaker, 1)
    asyncio.run(cancel_inside())
    assert (breaker.state, breaker.fail_counter) == ("closed", 1)

    trip(breaker, 2)
    expire(store)
    asyncio.run(cancel_inside())  # the cancelled call was the trial
    assert (breaker.state, breaker.fail_counter) == ("half-open", 3)
    assert breaker.call(ok) == "ok"  # a new trial is let through
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    "exc_type", [asyncio.CancelledError, KeyboardInterrupt, SystemExit, GeneratorExit]
)
def test_base_exceptions_are_no_outcome(
    breaker: Breaker, store: pybreaker.CircuitMemoryStorage, exc_type: type[BaseException]
) -> None:
    """A BaseException that is no Exception propagates and is neither failure nor success:
    the count stays, and a half-open trial it ended is free again."""

    def interrupted() -> None:
        raise exc_type

    trip(breaker, 1)
    with pytest.raises(exc_type):
        breaker.call(interrupted)
    assert breaker.fail_counter == 1
    with pytest.raises(exc_type), breaker:
        interrupted()
    assert breaker.fail_counter == 1

    trip(breaker, 2)
    expire(store)
    with pytest.raises(exc_type):
        breaker.call(interrupted)
    assert (breaker.state, breaker.fail_counter) == ("half-open", 3)
    assert breaker.call(ok) == "ok"
    assert breaker.state == "closed"


# --------------------------------------------------------------------------- exclude


class AbstractError(Exception, metaclass=abc.ABCMeta):
    """An exception class whose metaclass is not ``type``."""


def test_excluded_errors_are_no_failures(store: pybreaker.CircuitMemoryStorage) -> None:
    """Excluded types and predicates do not count as failures; as in pybreaker they count
    as successes (the service answered) and reset the count."""
    breaker = Breaker(
        "catalog",
        fail_max=2,
        exclude=[NotFound, lambda exc: isinstance(exc, ValueError) and "bad input" in str(exc)],
        state_storage=store,
    )

    def raises(exc: Exception) -> None:
        raise exc

    trip(breaker, 1)
    for exc in (NotFound("sku"), ValueError("bad input: x")):
        with pytest.raises(type(exc)):
            breaker.call(raises, exc)
        assert (breaker.state, breaker.fail_counter) == ("closed", 0)
    with pytest.raises(ValueError, match="other"):
        breaker.call(raises, ValueError("other"))
    assert breaker.fail_counter == 1


def test_excluded_error_of_the_trial_closes(store: pybreaker.CircuitMemoryStorage) -> None:
    """A trial that ends in an excluded error shows a working service: the breaker closes."""
    breaker = Breaker("catalog", fail_max=1, exclude=[NotFound], state_storage=store)
    trip(breaker, 1)
    expire(store)
    with pytest.raises(NotFound):
        breaker.call(raising(NotFound("sku")))
    assert breaker.state == "closed"


def test_exclude_by_exception_class_with_another_metaclass() -> None:
    """An excluded class whose metaclass is ABCMeta excludes its own instances only
    (pybreaker takes such a class for a predicate and so excludes everything)."""
    breaker = Breaker("abc", fail_max=5, exclude=[AbstractError])

    class Concrete(AbstractError):
        pass

    with pytest.raises(Concrete):
        breaker.call(raising(Concrete()))
    assert breaker.fail_counter == 0
    trip(breaker, 1)
    assert breaker.fail_counter == 1


# --------------------------------------------------------------------------- listeners, storage


def test_listeners_see_calls_outcomes_and_state_changes(
    store: pybreaker.CircuitMemoryStorage,
) -> None:
    """pybreaker listeners get before_call, failure, success and every state change."""
    recorder = Recorder()
    breaker = Breaker("payments", fail_max=2, listeners=[recorder], state_storage=store)
    assert breaker.pybreaker.listeners == (recorder,)
    trip(breaker, 2)
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    expire(store)
    breaker.call(ok)
    assert recorder.events == [
        ("before_call", "boom"),
        ("failure", "Boom"),
        ("before_call", "boom"),
        ("failure", "Boom"),
        ("state_change", "closed", "open"),
        ("state_change", "open", "half-open"),
        ("before_call", "ok"),
        ("state_change", "half-open", "closed"),  # pybreaker tells of the change first
        ("success",),
    ]


def test_two_breakers_share_a_state_storage(store: pybreaker.CircuitMemoryStorage) -> None:
    """Breakers on one storage share state and counts: one opens, the other refuses, and a
    trial through either closes both (as CircuitRedisStorage does between processes)."""
    recorder = Recorder()
    first = Breaker("first", fail_max=2, state_storage=store)
    second = Breaker("second", fail_max=2, state_storage=store, listeners=[recorder])
    trip(first, 1)
    assert second.fail_counter == 1
    trip(first, 1)
    assert (second.state, second.fail_counter) == ("open", 2)
    assert ("state_change", "closed", "open") in recorder.events
    with pytest.raises(CircuitOpenError, match="'second' is open"):
        second.call(ok)
    expire(store)
    assert second.call(ok) == "ok"
    assert first.state == second.state == "closed"


def test_pybreaker_property_is_the_underlying_breaker(
    store: pybreaker.CircuitMemoryStorage,
) -> None:
    """``breaker.pybreaker`` is a pybreaker.CircuitBreaker configured as the Breaker is."""
    breaker = Breaker("payments", fail_max=4, reset_timeout=12.5, state_storage=store)
    cb = breaker.pybreaker
    assert isinstance(cb, pybreaker.CircuitBreaker)
    assert (cb.name, cb.fail_max, cb.reset_timeout) == ("payments", 4, 12.5)
    assert breaker.name == "payments"
    assert repr(breaker) == "<Breaker 'payments' closed fail_counter=0>"


# --------------------------------------------------------------------------- by hand, real time


def test_open_and_close_by_hand(breaker: Breaker, store: pybreaker.CircuitMemoryStorage) -> None:
    """open() refuses calls at once; close() lets them through and resets the count, and a
    trial under way when the breaker is closed by hand decides nothing."""
    trip(breaker, 2)
    breaker.open()
    with pytest.raises(CircuitOpenError):
        breaker.call(ok)
    breaker.close()
    assert (breaker.state, breaker.fail_counter) == ("closed", 0)

    breaker.open()
    expire(store)

    def trial_closed_by_hand() -> None:
        breaker.close()
        raise Boom("late")

    with pytest.raises(Boom):
        breaker.call(trial_closed_by_hand)
    assert (breaker.state, breaker.fail_counter) == ("closed", 0)


def test_real_reset_timeout_elapses() -> None:
    """With pybreaker's own clock and a 50 ms reset timeout, a trial is let through once
    the timeout has run out (waited for with a deadline, not a guessed sleep)."""
    breaker = Breaker("tiny", fail_max=1, reset_timeout=0.05)
    trip(breaker, 1)
    refusals: list[CircuitOpenError] = []

    def trial_let_through() -> bool:
        try:
            breaker.call(ok)
        except CircuitOpenError as exc:
            refusals.append(exc)
            return False
        return True

    wait_for(trial_let_through, "the reset timeout to run out")
    assert breaker.state == "closed"
    assert all(exc.retry_at is not None for exc in refusals)


# --------------------------------------------------------------------------- decorator, with


def test_decorator_keeps_metadata_and_guards_sync_and_async(breaker: Breaker) -> None:
    """@breaker keeps name, docstring and signature; an async def stays a coroutine
    function; both kinds count failures and are refused when open."""

    @breaker
    def charge(amount: int, *, currency: str = "EUR") -> str:
        """Charge the card."""
        if amount < 0:
            raise Boom("negative")
        return f"{amount} {currency}"

    @breaker
    async def refund(amount: int) -> int:
        """Refund the card."""
        if amount < 0:
            raise Boom("negative")
        return amount

    assert (charge.__name__, charge.__doc__) == ("charge", "Charge the card.")
    assert (refund.__name__, refund.__doc__) == ("refund", "Refund the card.")
    assert str(inspect.signature(refund)) == "(amount: 'int') -> 'int'"
    assert not inspect.iscoroutinefunction(charge)
    assert inspect.iscoroutinefunction(refund)
    assert charge(5, currency="CHF") == "5 CHF"
    assert asyncio.run(refund(7)) == 7

    with pytest.raises(Boom):
        charge(-1)
    with pytest.raises(Boom):
        asyncio.run(refund(-1))
    assert breaker.fail_counter == 2
    with pytest.raises(Boom):
        asyncio.run(refund(-1))
    assert breaker.state == "open"
    with pytest.raises(CircuitOpenError):
        charge(1)
    with pytest.raises(CircuitOpenError):
        asyncio.run(refund(1))


def test_decorator_refuses_generator_functions(breaker: Breaker) -> None:
    """A generator function's body runs after the call returns, outside the breaker, so
    decorating one is an error rather than a guard that guards nothing."""

    def numbers() -> Iterator[int]:
        yield 1

    async def stream() -> Any:
        yield 1

    for func in (numbers, stream):
        with pytest.raises(TypeError, match="generator function"):
            breaker(func)


def test_sync_call_of_a_coroutine_function_is_refused(breaker: Breaker) -> None:
    """call() on an async function would record a success for a call that never ran; it
    raises TypeError instead, closes the coroutine, and records nothing."""

    async def later() -> None:
        raise Boom("never")

    with pytest.raises(TypeError, match="call_async"):
        breaker.call(later)  # type: ignore[unused-coroutine]  # the misuse under test
    assert breaker.fail_counter == 0


def test_context_managers(breaker: Breaker, store: pybreaker.CircuitMemoryStorage) -> None:
    """`with breaker:` and `async with breaker:` count an exception leaving the block as a
    failure, a clean exit as a success, and skip the block when the breaker is open."""
    with pytest.raises(Boom), breaker:
        raise Boom("in block")
    assert breaker.fail_counter == 1
    with breaker, breaker:  # nested entries of one breaker pair up
        pass
    assert breaker.fail_counter == 0

    async def main() -> None:
        async with breaker:
            pass
        for _ in range(3):
            with pytest.raises(Boom):
                async with breaker:
                    raise Boom("in async block")

    asyncio.run(main())
    assert breaker.state == "open"

    ran = []
    with pytest.raises(CircuitOpenError), breaker:
        ran.append(True)

    async def refused() -> None:
        with pytest.raises(CircuitOpenError):
            async with breaker:
                ran.append(True)

    asyncio.run(refused())
    assert ran == []

    expire(store)
    with breaker:
        assert breaker.state == "half-open"
    assert breaker.state == "closed"


def test_constructor_validates_its_arguments() -> None:
    """A breaker needs a name, an integer fail_max ≥ 1 and a finite reset_timeout ≥ 0."""
    for kwargs in (
        {"name": ""},
        {"name": "x", "fail_max": 0},
        {"name": "x", "fail_max": True},
        {"name": "x", "reset_timeout": -1.0},
        {"name": "x", "reset_timeout": float("inf")},
    ):
        with pytest.raises(ValueError, match=r"name|fail_max|reset_timeout"):
            Breaker(**kwargs)


# --------------------------------------------------------------------------- the state machine

STEPS = st.lists(st.sampled_from(["ok", "fail", "excluded", "cancel", "expire"]), max_size=40)


@settings(deadline=None)
@given(steps=STEPS, fail_max=st.integers(1, 4))
def test_follows_the_classic_state_machine(steps: list[str], fail_max: int) -> None:
    """Any sequence of outcomes and timeouts leaves the breaker in the state, with the
    count, that the classic closed/open/half-open machine prescribes."""
    store = storage()
    breaker = Breaker("model", fail_max=fail_max, exclude=[NotFound], state_storage=store)
    state, count, elapsed = "closed", 0, False

    def run(step: str) -> None:
        if step == "fail":
            raise Boom
        if step == "excluded":
            raise NotFound
        if step == "cancel":
            raise asyncio.CancelledError

    for step in steps:
        if step == "expire":
            if state == "open":
                expire(store)
                elapsed = True
            continue
        if state == "open" and not elapsed:
            with pytest.raises(CircuitOpenError):
                breaker.call(run, step)
            continue
        if state == "open":
            state = "half-open"
        with contextlib.suppress(Boom, NotFound, asyncio.CancelledError):
            breaker.call(run, step)
        if step in ("ok", "excluded"):
            state, count = "closed", 0
        elif step == "fail":
            count += 1
            if state == "half-open" or count >= fail_max:
                state, elapsed = "open", False
        assert (breaker.state, breaker.fail_counter) == (state, count), step


def test_mesh_breaker_is_one_per_name() -> None:
    """mesh.breaker(name) returns the same breaker each time and refuses other options."""
    from inmesh import CircuitOpenError, Mesh
    from inmesh.registry import MemoryRegistry

    with Mesh(MemoryRegistry()) as mesh:
        first = mesh.breaker("payments", fail_max=1, reset_timeout=60)
        assert mesh.breaker("payments") is first
        with pytest.raises(ValueError, match="other options"):
            mesh.breaker("payments", fail_max=2)

        @first
        def charge() -> None:
            raise OSError("card network down")

        with pytest.raises(OSError, match="card network down"):
            charge()
        with pytest.raises(CircuitOpenError):
            charge()
