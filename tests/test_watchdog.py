"""The deadline watchdog of the sync transport: timers fire, cancelled ones let go."""

from __future__ import annotations

import gc
import threading
import time
import weakref

from inmesh.transports._watchdog import Watchdog


class _Held:
    """Stands for the response a deadline timer's callback keeps alive."""

    def cut(self) -> None:
        pass


def test_a_timer_fires_at_its_deadline() -> None:
    """An armed timer's callback runs, and not before its deadline."""
    dog = Watchdog()
    fired = threading.Event()
    armed = time.monotonic()
    dog.arm(armed + 0.05, fired.set)
    assert fired.wait(5.0)
    assert time.monotonic() - armed >= 0.05


def test_a_cancelled_timer_never_fires_and_lets_go_of_its_callback() -> None:
    """Cancelling drops the callback at once, so its response can be collected."""
    dog = Watchdog()
    fired = threading.Event()
    held = _Held()
    ref = weakref.ref(held)
    timer = dog.arm(time.monotonic() + 0.05, held.cut)
    later = dog.arm(time.monotonic() + 0.2, fired.set)  # proves the thread went past it
    timer.cancel()
    assert timer.done
    del held
    gc.collect()
    assert ref() is None  # the heap entry no longer keeps the response alive
    assert fired.wait(5.0)
    assert later.done  # fired timers are done too


def test_cancelled_timers_do_not_pile_up() -> None:
    """Sequential requests each arm a timer seconds ahead and cancel it at once: the heap
    stays near the number of live timers, not one entry per request."""
    dog = Watchdog()
    far = time.monotonic() + 3600
    live = dog.arm(far, _Held().cut)
    for _ in range(5000):
        dog.arm(far, _Held().cut).cancel()
    assert len(dog) <= 2 * Watchdog._COMPACT_AT
    assert not live.done


def test_the_thread_is_woken_only_for_a_timer_due_before_it_would_wake() -> None:
    """Timers due after the sleeping thread's next wake-up (every request's, one after
    another) do not wake it; one due earlier does, and fires on time."""
    dog = Watchdog()
    notified = []
    notify = dog._wake.notify

    def counting(n: int = 1) -> None:
        notified.append(n)
        notify(n)

    dog._wake.notify = counting  # type: ignore[method-assign]
    first = time.monotonic() + 30
    dog.arm(first, _Held().cut)
    deadline = time.monotonic() + 5
    while dog._wakes_at != first and time.monotonic() < deadline:  # the thread sleeps
        time.sleep(0.001)
    assert dog._wakes_at == first
    woken = len(notified)
    for step in range(1000):
        dog.arm(first + 1 + step / 1000, _Held().cut).cancel()
    assert len(notified) == woken
    fired = threading.Event()
    dog.arm(time.monotonic() + 0.05, fired.set)
    assert len(notified) == woken + 1
    assert fired.wait(5.0)
