"""Circuit breakers for arbitrary calls: pybreaker's state machine, without its limits.

::

    breaker = Breaker("payments", fail_max=5, reset_timeout=30.0)

    @breaker
    async def charge(order): ...     # or a def; or `with breaker:`, `async with breaker:`

A breaker is *closed* (calls go through; consecutive failures are counted), *open* (calls
are refused with ``CircuitOpenError`` and never made, until ``reset_timeout`` seconds have
passed) or *half-open* (one trial call goes through: its success closes the breaker, its
failure opens it again).

pybreaker keeps the state, the counters, the listeners and the state storage (so
``CircuitRedisStorage`` shares a breaker between processes, and pybreaker listeners work
unchanged). This module drives it and fixes what pybreaker 1.4 gets wrong for a mesh:

- ``CircuitBreaker.call()`` holds the breaker's lock for the whole call, so every caller
  waits for the one before. Here the lock is taken for bookkeeping only -- ``_admit``
  before the call (may it go?) and ``_settle`` after it (record the outcome) -- and never
  across the call or an ``await``: concurrent callers run in parallel.
- pybreaker's async support is Tornado's. ``call_async``, ``async with`` and decorated
  ``async def`` functions share the sync path's bookkeeping, which never awaits, sleeps or
  does I/O of its own, so it holds the event loop for microseconds.
- pybreaker counts every ``BaseException`` as a failure, cancellation included. Here only
  an ``Exception`` is an outcome. ``asyncio.CancelledError``, ``KeyboardInterrupt``,
  ``SystemExit``, ``GeneratorExit`` (any BaseException that is no Exception) are neither
  failure nor success: the call is forgotten, and a half-open trial it held is released.
  A caller's own timeout around the call cancels it and so does not count either; put the
  timeout *inside* the guarded function when slow calls should open the breaker.
- Once calls no longer queue on the lock, pybreaker's half-open state lets every caller
  through. Here it admits one trial at a time and refuses the others with
  ``CircuitOpenError`` until the trial has decided.

Theory of operation
-------------------
Each admitted call holds a ticket stamped with the breaker's *generation*, which advances
on every state change this breaker sees (its own, or one it reads from a shared storage).
An outcome is recorded only while its generation is current. A call admitted while closed
that ends after the breaker opened -- or after a trial closed it again -- is old news: it
neither re-opens nor closes anything (gobreaker does the same), and in half-open only the
trial's outcome decides. Outcomes go through the state object's ``_handle_success()`` /
``_handle_error()``, the same path ``CircuitBreaker.call()`` takes, so counters, ``exclude``
and listeners behave as in pybreaker: an excluded exception counts as a success (the
service answered), and a trial's excluded exception closes the breaker.

The open -> half-open decision is pybreaker's own (``CircuitOpenState.before_call``: the
wall clock against the ``opened_at`` stamp in the storage, which other processes share).
``_admit`` asks it with a no-op probe that ``_Circuit.call`` runs without bookkeeping;
nothing here reads the clock.

Limits kept
-----------
- pybreaker calls listeners (``state_change``, ``success``, ``failure``) under the lock:
  keep them quick. ``before_call`` runs outside it.
- A storage that does I/O (``CircuitRedisStorage``) does it inside the bookkeeping,
  blocking, also on the async path.
- The single trial is per ``Breaker`` object: with a shared storage, each process (or each
  ``Breaker`` on that storage) may have one trial under way.
- A trial that never ends holds the half-open gate until it does (or until ``open()`` or
  ``close()``): give the guarded call its own timeout.
- Call through the ``Breaker``: ``breaker.pybreaker.call()`` still holds the lock for the
  whole call and bypasses the single-trial gate.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import pybreaker

# Named directly for the annotations in Breaker, whose `pybreaker` property shadows the module.
from pybreaker import (
    CircuitBreaker,
    CircuitBreakerListener,
    CircuitBreakerState,
    CircuitBreakerStorage,
)

from inmesh.exceptions import MeshError

__all__ = ["Breaker", "CircuitOpenError"]

P = ParamSpec("P")
T = TypeVar("T")

Exclusion = type[BaseException] | Callable[[BaseException], bool]


class CircuitOpenError(MeshError, pybreaker.CircuitBreakerError):
    """A call a breaker refused: it is open, or half-open with its trial call under way.

    The guarded function was not called. ``breaker`` is the breaker's name; ``retry_at`` is
    when it lets a trial call through (wall-clock seconds since the epoch, as
    ``time.time()``), or None when it waits for the trial under way to end.
    """

    def __init__(self, message: str, *, breaker: str, retry_at: float | None) -> None:
        super().__init__(message)
        self.breaker = breaker
        self.retry_at = retry_at

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = functools.partial(type(self), breaker=self.breaker, retry_at=self.retry_at)
        return (rebuild, (str(self),))


def _probe() -> None:
    """Stands for the next call while pybreaker decides whether the reset timeout is over."""


def _with_block() -> None:
    """Stands for the body of a ``with breaker:`` block in listeners' ``before_call``."""


class _Circuit(CircuitBreaker):
    """pybreaker's breaker with two corrections that the ``Breaker`` relies on."""

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # The open state's before_call hands the call back to us once it has moved to
        # half-open; the probe is no call, so it skips the bookkeeping.
        if func is _probe:
            return func(*args, **kwargs)
        return super().call(func, *args, **kwargs)

    def is_system_error(self, exception: BaseException) -> bool:
        # pybreaker tests `type(exclusion) is type`, so an exception class with another
        # metaclass (ABCMeta) is taken for a predicate, and its truthy instance excludes all.
        for exclusion in self.excluded_exceptions:
            if isinstance(exclusion, type):
                if isinstance(exception, exclusion):
                    return False
            elif exclusion(exception):
                return False
        return True


@dataclass(frozen=True, slots=True, eq=False)
class _Ticket:
    """An admitted call: the generation it was admitted in, and whether it is the trial.

    The trial's ticket is its own (it is known by identity); the other calls of a
    generation share one.
    """

    generation: int
    trial: bool


# The tickets of the `with` blocks under way in this thread or task, innermost last.
_ENTERED: contextvars.ContextVar[tuple[tuple[Breaker, _Ticket], ...]] = contextvars.ContextVar(
    "inmesh_breaker_entered", default=()
)


class Breaker:
    """A circuit breaker named ``name`` for arbitrary sync and async calls; thread-safe.

    Opens after ``fail_max`` consecutive failures and refuses calls for ``reset_timeout``
    seconds, then lets one trial call through. ``exclude`` lists exception types (or
    predicates on the exception) that are no failures. ``listeners`` are
    ``pybreaker.CircuitBreakerListener`` objects; ``state_storage`` is a pybreaker storage
    (in memory by default; ``CircuitRedisStorage`` to share the breaker between processes).

    Use it as a decorator (on a ``def`` or an ``async def``), as ``with breaker:`` or
    ``async with breaker:`` (an exception leaving the block is the failure), or through
    ``call()`` / ``call_async()``.
    """

    __slots__ = ("_circuit", "_generation", "_lock", "_state", "_storage", "_ticket", "_trial")

    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 5,
        reset_timeout: float = 30.0,
        exclude: Iterable[Exclusion] = (),
        listeners: Iterable[CircuitBreakerListener] = (),
        state_storage: CircuitBreakerStorage | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a breaker needs a name, got {name!r}")
        if isinstance(fail_max, bool) or not isinstance(fail_max, int) or fail_max < 1:
            raise ValueError(f"breaker {name!r}: fail_max must be an int ≥ 1, got {fail_max!r}")
        if not math.isfinite(reset_timeout) or reset_timeout < 0:
            raise ValueError(
                f"breaker {name!r}: reset_timeout must be finite seconds ≥ 0, got {reset_timeout!r}"
            )
        if state_storage is None:
            state_storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        self._storage = state_storage
        self._circuit = _Circuit(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            exclude=list(exclude),
            listeners=list(listeners),
            state_storage=self._storage,
            name=name,
        )
        # pybreaker's own lock: its open()/close()/half_open() and listener registration
        # take it too, so they never interleave with the bookkeeping here.
        self._lock = self._circuit._lock
        self._state = self._circuit.state
        self._generation = 0
        self._ticket = _Ticket(0, trial=False)  # shared by the calls of one generation
        self._trial: _Ticket | None = None

    # ------------------------------------------------------------------ public view

    @property
    def name(self) -> str:
        """The name given at construction (also the pybreaker breaker's name)."""
        return cast("str", self._circuit.name)

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half-open"``.

        An open breaker stays ``"open"`` after its reset timeout until the next call, which
        moves it to half-open and becomes the trial.
        """
        with self._lock:
            return self._current().name

    @property
    def fail_counter(self) -> int:
        """Consecutive failures, as the state storage counts them."""
        return self._circuit.fail_counter

    @property
    def pybreaker(self) -> CircuitBreaker:
        """The underlying ``pybreaker.CircuitBreaker``: its listeners, storage and settings."""
        return self._circuit

    def open(self) -> None:
        """Open the breaker now: calls are refused for ``reset_timeout`` seconds."""
        with self._lock:
            self._circuit.open()
            self._current()

    def close(self) -> None:
        """Close the breaker now, resetting its failure count."""
        with self._lock:
            self._circuit.close()
            self._current()

    def __repr__(self) -> str:
        return f"<Breaker {self.name!r} {self.state} fail_counter={self.fail_counter}>"

    # ------------------------------------------------------------------ calling

    def __call__(self, func: Callable[P, T]) -> Callable[P, T]:
        """Decorate ``func`` (a ``def`` or an ``async def``) so that each call is guarded."""
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError(
                f"{func!r} is a generator function: its body runs after the call returns, "
                "outside the breaker; guard the code that consumes it with `with breaker:`"
            )
        if inspect.iscoroutinefunction(func):
            coroutine_function = cast("Callable[P, Awaitable[Any]]", func)

            @functools.wraps(func)
            async def guarded_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                return await self.call_async(coroutine_function, *args, **kwargs)

            return cast("Callable[P, T]", guarded_async)

        @functools.wraps(func)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(func, *args, **kwargs)

        return guarded

    def call(self, func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``func(*args, **kwargs)`` if the breaker lets it through, and record how it went.

        Raises ``CircuitOpenError`` without calling ``func`` when the breaker refuses.
        """
        ticket = self._enter(func, args, kwargs)
        try:
            result = func(*args, **kwargs)
        except Exception as exc:
            self._settle(ticket, exc)
            raise
        except BaseException:
            self._release(ticket)
            raise
        if inspect.iscoroutine(result):
            result.close()
            self._release(ticket)
            raise TypeError(f"{func!r} returned a coroutine: guard it with call_async()")
        self._settle(ticket, None)
        return result

    async def call_async(
        self, func: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Await ``func(*args, **kwargs)`` if the breaker lets it through, and record how it went.

        Raises ``CircuitOpenError`` without calling ``func`` when the breaker refuses. A
        cancellation is no outcome: it propagates and the breaker forgets the call.
        """
        ticket = self._enter(func, args, kwargs)
        try:
            result = await func(*args, **kwargs)
        except Exception as exc:
            self._settle(ticket, exc)
            raise
        except BaseException:
            self._release(ticket)
            raise
        self._settle(ticket, None)
        return result

    def __enter__(self) -> Breaker:
        ticket = self._enter(_with_block, (), {})
        _ENTERED.set((*_ENTERED.get(), (self, ticket)))
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        ticket = self._leave()
        if exc is None:
            self._settle(ticket, None)
        elif isinstance(exc, Exception):
            self._settle(ticket, exc)
        else:
            self._release(ticket)

    async def __aenter__(self) -> Breaker:
        return self.__enter__()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.__exit__(exc_type, exc, tb)

    def _leave(self) -> _Ticket:
        entered = _ENTERED.get()
        for i in range(len(entered) - 1, -1, -1):
            if entered[i][0] is self:
                _ENTERED.set(entered[:i] + entered[i + 1 :])
                return entered[i][1]
        raise RuntimeError(f"breaker {self.name!r} left without being entered in this context")

    # ------------------------------------------------------------------ bookkeeping

    def _current(self) -> CircuitBreakerState:
        """The state in force, with the generation advanced if it changed. Under the lock."""
        # Reading `state` also picks up a change made through a shared storage (and tells
        # the listeners). pybreaker makes a new state object on every transition.
        state = self._circuit.state
        if state is not self._state:
            self._state = state
            self._generation += 1
            self._ticket = _Ticket(self._generation, trial=False)
            self._trial = None
        return state

    def _enter(self, func: Callable[..., Any], args: Any, kwargs: Any) -> _Ticket:
        ticket = self._admit()
        try:
            for listener in self._circuit.listeners:
                listener.before_call(self._circuit, func, *args, **kwargs)
        except BaseException:
            self._release(ticket)
            raise
        return ticket

    def _admit(self) -> _Ticket:
        with self._lock:
            state = self._current()
            if state.name == pybreaker.STATE_OPEN:
                try:
                    # Raises while the reset timeout runs; past it, moves to half-open.
                    state.before_call(_probe)
                except pybreaker.CircuitBreakerError:
                    raise self._refusal() from None
                state = self._current()
            if state.name == pybreaker.STATE_HALF_OPEN:
                if self._trial is not None:
                    raise self._refusal()
                self._trial = _Ticket(self._generation, trial=True)
                return self._trial
            return self._ticket

    def _settle(self, ticket: _Ticket, error: Exception | None) -> None:
        """Record a call's outcome: ``error`` None is a success."""
        with self._lock:
            try:
                state = self._current()
                if ticket.generation != self._generation:
                    return
                if error is None:
                    state._handle_success()
                else:
                    # Tripping raises pybreaker's error in place of the call's: the caller
                    # gets its own exception, since its call was made.
                    with suppress(pybreaker.CircuitBreakerError):
                        state._handle_error(error, reraise=False)
            finally:
                if self._trial is ticket:
                    self._trial = None

    def _release(self, ticket: _Ticket) -> None:
        """Forget a call that ended with no outcome, freeing the trial it may hold."""
        with self._lock:
            if self._trial is ticket:
                self._trial = None

    def _refusal(self) -> CircuitOpenError:
        if self._state.name == pybreaker.STATE_HALF_OPEN:
            return CircuitOpenError(
                f"circuit breaker {self.name!r} is half-open and its trial call is under way; "
                "it decides when that call ends (call not made)",
                breaker=self.name,
                retry_at=None,
            )
        opened_at = self._storage.opened_at
        if opened_at is None:
            retry_at = None
            when = "on the next call"
        else:
            retry_at = opened_at.timestamp() + self._circuit.reset_timeout
            moment = opened_at.fromtimestamp(retry_at, opened_at.tzinfo)
            when = f"at {moment.isoformat(timespec='milliseconds')}"
        return CircuitOpenError(
            f"circuit breaker {self.name!r} is open; it lets a trial call through {when} "
            "(call not made)",
            breaker=self.name,
            retry_at=retry_at,
        )
