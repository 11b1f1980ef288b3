"""``MeshAioChannel``: the mesh as a ``grpc.aio.Channel``.

The asyncio twin of ``inmesh.transports.grpc``: the same core (target, plan, endpoint
channels, attempt bookkeeping, delivery), the same flow, a driver that awaits where the
sync one blocks. ``grpc.aio`` has no ``intercept_channel``, so this is a channel of its
own whose multi-callables return call objects that implement grpc.aio's call interfaces.

Each call runs as a task started when the call is made, as grpc.aio's own calls do.
Unary-response calls (unary-unary, stream-unary) await each attempt; streaming-response
calls (unary-stream, stream-stream) count an attempt as answered at its first message and
retry only before it, after which reads go to that attempt's own grpc.aio call.
Request-streaming calls are never retried; ``write()`` and ``done_writing()`` go to the
attempt once it exists. Errors are ``grpc.aio.AioRpcError``s: the last attempt's own, or
the mesh's local reply with its reason chained. ``initial_metadata()`` of an answered
call carries the route's response header operations, as the sync channel's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Sequence
from typing import TYPE_CHECKING, Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type information
import grpc.aio  # type: ignore[import-untyped]

from inmesh._namedtuples import build as _tuple
from inmesh.flow import (
    Attempted,
    Finish,
    Send,
    Wait,
    express_abandon,
    express_send,
    express_settle,
    express_succeeded,
)
from inmesh.plan import LocalReply, Upstream
from inmesh.testing.faults import OVERLAY
from inmesh.transports.grpc import (
    _COUNT_ONLY,
    _NOTHING,
    _OK,
    MIRROR_TIMEOUT,
    CallSpec,
    ChannelCore,
    Started,
    _Code,
    attempt_metadata,
    cancelled_details,
    edited_initial_metadata,
    local_error,
    outcome_of,
    reply_details,
    reply_trailers,
)

if TYPE_CHECKING:
    from inmesh.balancing import EndpointStats
    from inmesh.mesh import Mesh
    from inmesh.transports._resources import Entry

__all__ = ["MeshAioChannel"]

log = logging.getLogger("inmesh.grpc")

_EOF = grpc.aio.EOF


class _SentMetadata(grpc.aio.Metadata):  # type: ignore[misc]  # grpc is untyped
    """What one attempt sends, handed to grpc.aio as the ``Metadata`` it converts any other
    metadata to, and read back as fast as it is read: grpc.aio tests it for truth and
    iterates it once into a tuple. A plain tuple costs ~21,000 instructions a call in that
    conversion, a prebuilt one of these ~5,000 (an empty call ~8,000). Never changed after
    it is made: grpc.aio only reads it, and the mesh's endpoint channels have no
    interceptors."""

    def __init__(self, *pairs: tuple[str, Any]) -> None:
        super().__init__(*pairs)
        self._pairs = pairs

    def __len__(self) -> int:
        return len(self._pairs)

    def __iter__(self) -> Any:
        return iter(self._pairs)


# The usual attempt's: no caller metadata, no route edits; made once.
_SENT_COUNT_ONLY = tuple(_SentMetadata(*pairs) for pairs in _COUNT_ONLY)


def sent_metadata(metadata: Any, upstream: Upstream | None, attempt: int) -> _SentMetadata:
    """``attempt_metadata`` as grpc.aio takes it fastest."""
    edits = upstream is not None and upstream.request_ops
    if not metadata and not edits and attempt < len(_SENT_COUNT_ONLY):
        return _SENT_COUNT_ONLY[attempt]
    return _SentMetadata(*attempt_metadata(metadata, upstream, attempt))


class _AioCore(ChannelCore):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tasks: set[asyncio.Task[Any]] = set()

    def make_channel(self, target: str, options: list[tuple[str, Any]]) -> Any:
        if self.credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self.credentials, options=options)

    def close_channel(self, channel: Any) -> None:
        self.spawn(channel.close())

    def first_metadata(self, upstream: Upstream) -> Any:
        return sent_metadata(None, upstream, 1)

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)  # keep a reference until it ends
        task.add_done_callback(self.tasks.discard)

    def local_error(self, reply: LocalReply, upstream: Upstream | None) -> Any:
        code, reason = local_error(reply, self.where(upstream))
        details = reply_details(reply)
        error = grpc.aio.AioRpcError(
            code,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(*reply_trailers(reply)),
            details,
            f"inmesh: {details}",
        )
        error.__cause__ = reason
        return error

    def mirror(self, spec: CallSpec, request: Any, metadata: Any, upstream: Upstream) -> None:
        self.spawn(self._mirror(spec, request, metadata, upstream))

    async def _mirror(
        self, spec: CallSpec, request: Any, metadata: Any, upstream: Upstream
    ) -> None:
        hold = None
        try:
            hold = self.mirror_hold(upstream)
            if hold is not None:
                await self.callable(hold.entry, spec, upstream)(
                    request,
                    timeout=MIRROR_TIMEOUT,
                    metadata=sent_metadata(metadata, upstream, 1),
                )
        except Exception as exc:
            log.debug("mirror of %s failed: %s", spec.method, exc)
        finally:
            if hold is not None:
                self.release(hold)
            self.mirror_done()


class _Answered:
    """The done callback of an attempt sent at creation: calls ``_AioCall._answered`` once,
    then lets go of the call. grpc.aio keeps a call's callbacks for as long as the call,
    and the call object holds that grpc.aio call: a bound method would make every such
    call a reference cycle, left to the cyclic collector."""

    __slots__ = ("_call",)

    def __init__(self, call: _AioCall) -> None:
        self._call: _AioCall | None = call

    def __call__(self, _grpc_call: Any) -> None:
        call, self._call = self._call, None
        if call is not None and call._state is _SENT:  # else the call is driven already
            call._answered()


class MeshAioChannel(grpc.aio.Channel):  # type: ignore[misc]  # grpc is untyped
    """A ``grpc.aio.Channel`` to the logical ``target``, routed by the mesh.

    ``options`` and ``credentials`` go to every endpoint channel (insecure when
    ``credentials`` is None). Generated stubs work unchanged.
    """

    def __init__(
        self,
        mesh: Mesh,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        credentials: Any = None,
        seed: int | None = None,
    ) -> None:
        self._core = _AioCore(mesh, target, options=options, credentials=credentials, seed=seed)
        self._closed = asyncio.Event()

    @property
    def target(self) -> str:
        return self._core.target

    def _callable(
        self, shape: str, method: Any, ser: Any, deser: Any, registered: Any, *, replayable: bool
    ) -> _AioCallable:
        if isinstance(method, bytes):
            method = method.decode()
        return _AioCallable(self._core, CallSpec(shape, method, ser, deser, registered), replayable)

    def unary_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _AioCallable:
        return self._callable(
            "unary_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
            replayable=True,
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _AioCallable:
        return self._callable(
            "unary_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
            replayable=True,
        )

    def stream_unary(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _AioCallable:
        return self._callable(
            "stream_unary",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
            replayable=False,
        )

    def stream_stream(
        self,
        method: str,
        request_serializer: Callable[[Any], bytes] | None = None,
        response_deserializer: Callable[[bytes], Any] | None = None,
        _registered_method: Any = False,
    ) -> _AioCallable:
        return self._callable(
            "stream_stream",
            method,
            request_serializer,
            response_deserializer,
            _registered_method,
            replayable=False,
        )

    def get_state(
        self,
        try_to_connect: bool = False,  # noqa: ARG002 -- endpoint channels connect on demand
    ) -> Any:
        """READY: the mesh channel takes calls at once; its endpoint channels connect on
        demand. SHUTDOWN once closed."""
        if self._core.closed:
            return grpc.ChannelConnectivity.SHUTDOWN
        return grpc.ChannelConnectivity.READY

    async def wait_for_state_change(self, last_observed_state: Any) -> None:
        if self.get_state() != last_observed_state:
            return
        await self._closed.wait()

    async def channel_ready(self) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        """Close every endpoint channel (after ``grace`` seconds for calls in flight)."""
        core = self._core
        if core.closed:
            return
        core.closed = True
        self._closed.set()
        channels = core.channels.drain()
        await asyncio.gather(*(c.close(grace) for c in channels), return_exceptions=True)
        tasks = list(core.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> MeshAioChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close(None)

    def __repr__(self) -> str:
        return f"<MeshAioChannel {self._core.target}>"


class _AioCallable(
    grpc.aio.UnaryUnaryMultiCallable,  # type: ignore[misc]  # grpc is untyped
    grpc.aio.UnaryStreamMultiCallable,  # type: ignore[misc]
    grpc.aio.StreamUnaryMultiCallable,  # type: ignore[misc]
    grpc.aio.StreamStreamMultiCallable,  # type: ignore[misc]
):
    """Every shape's multi-callable: the spec says which call object a call makes."""

    __slots__ = ("_core", "_make", "_replayable", "_spec", "_writes")

    def __init__(self, core: _AioCore, spec: CallSpec, replayable: bool) -> None:
        self._core = core
        self._spec = spec
        self._replayable = replayable
        # Decided once, not per call: which call object, and whether it takes writes.
        self._make: type[_AioCall] = (
            _AioUnaryResponseCall if spec.shape.endswith("unary") else _AioStreamResponseCall
        )
        self._writes = spec.shape.startswith("stream")

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: Any = None,
        compression: Any = None,
    ) -> Any:  # a grpc.aio call of the spec's shape (grpc.aio is untyped)
        if credentials is None and wait_for_ready is None and compression is None:
            extra = _NO_EXTRA
        else:
            extra = (credentials, wait_for_ready, compression)
        return self._make(self, request, timeout, metadata, extra)


# A call's states. _SENT: an express call's first attempt went out when the call was made
# and nothing drives the call yet (an ``await``, or a task once that attempt ends, will).
_NEW, _RUNNING, _DONE, _SENT = 0, 1, 2, 3
_NO_EXTRA: tuple[Any, Any, Any] = (None, None, None)


class _AioCall:
    """What both call objects share: running the flow (inline in ``await``, or as a task
    when the call must run unawaited), the attempt in flight, the finished attempt's call
    (or the error), waiting for the end, cancellation, request writes.

    A call's starting state is the class's: the instance sets only what differs, and
    makes its lists of waiters and callbacks when it first needs them."""

    _state = _NEW
    _task: asyncio.Task[None] | None = None
    _waiters: list[asyncio.Future[None]] | None = None
    _callbacks: list[Callable[[Any], None]] | None = None
    _current: Any = None  # the attempt in flight (a grpc.aio call)
    _call: Any = None  # the delivered attempt's call
    _error: BaseException | None = None
    _upstream: Upstream | None = None  # the delivered attempt's plan
    _cancelled = False
    # Writes (request streaming without an iterator) wait for the attempt to exist.
    _ready: asyncio.Event | None = None
    _lazy: bool  # the call may wait to be awaited (unary response) or not (streams)
    _planned: tuple[Any, Any, Any, Any] | None = None  # ``core.start``'s, if made already
    # The express attempt sent at creation (_SENT): its Send, endpoint hold, start time.
    _sent: tuple[Send, Entry[Any], EndpointStats, float] | None = None

    def __init__(
        self,
        owner: _AioCallable,
        request: Any,
        timeout: float | None,
        metadata: Any,
        extra: tuple[Any, Any, Any],
    ) -> None:
        self._owner = owner
        self._request = request
        self._metadata = metadata
        self._extra = extra
        self._deadline = None if timeout is None else time.monotonic() + timeout
        if request is None and owner._writes:
            self._ready = asyncio.Event()
        if self._lazy and self._ready is None:
            self._open()
        else:
            self._start()  # a stream starts at once; writes need the call under way

    def _open(self) -> None:
        """Start a unary-response call: plan it now, and send an express call's first
        attempt now (``inmesh.flow``), a grpc.aio call that goes out on its own as grpc.aio's
        calls do; the rest runs when the call is awaited or, if it is not by then, when that
        attempt ends (``_answered``). Any other call is under way by the next loop turn,
        as grpc.aio's calls are, unless awaited first (the usual ``await stub.Get(...)``),
        which then runs it inline."""
        owner = self._owner
        core = owner._core
        try:
            planned = self._planned = core.start(owner._spec.method, self._metadata)
        except Exception as error:
            self._error = error
            self._state = _DONE
            return
        upstream, fast = planned[2], planned[3]
        if fast is None or OVERLAY.active or not isinstance(upstream, Upstream):
            asyncio.get_running_loop().call_soon(self._start)
            return
        self._upstream = upstream
        sent = express_send(upstream, fast.pick, time.monotonic(), self._deadline)
        try:
            if isinstance(sent, Finish):
                self._deliver(core.deliver(planned[1], upstream, sent))
                self._state = _DONE
                return
            call, entry, stats = self._begin(upstream, sent, fast.metadata)
        except BaseException as error:
            if not isinstance(sent, Finish):
                express_abandon(upstream, time.monotonic())
            if not isinstance(error, Exception):
                raise
            self._error = error
            self._state = _DONE
            return
        self._sent = (sent, entry, stats, time.monotonic())
        self._state = _SENT
        call.add_done_callback(_Answered(self))

    def _answered(self) -> None:
        """The express attempt sent at creation ended and nothing drives the call yet (state
        ``_SENT``, which ``_Answered`` checks): a task settles it now (its endpoint, its
        budgets, a retry)."""
        try:
            self._start()
        except RuntimeError:  # no running loop any more: give back what it holds
            log.debug("call to %s ended after its event loop", self._owner._spec.method)
            self._release_sent()
            self._cancelled = True
            self._finish()

    def _release_sent(self) -> None:
        """Give back what the attempt sent at creation holds, when it will not be settled
        (cancelled, or no loop left to settle it): its endpoint channel and active count
        (now, or when the attempt ends), its admission place and its retry-budget place."""
        sent, self._sent = self._sent, None
        if sent is not None and self._upstream is not None:
            made, entry, stats, _ = sent
            _stop(self._current)
            self._end(self._current, entry, stats, made)
            express_abandon(self._upstream, time.monotonic())

    def _start(self) -> None:
        """Run the call as a task, unless it runs already (inline in ``await``: that saves
        a task and two loop turns a call)."""
        if self._state is _NEW or self._state is _SENT:
            self._state = _RUNNING
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """The call, start to end: plan, drive the attempt flow, deliver the result (or
        keep the error). One coroutine: it runs on every call."""
        self._state = _RUNNING
        try:
            owner = self._owner
            core = owner._core
            planned = self._planned
            if planned is None:
                planned = core.start(owner._spec.method, self._metadata)
            snapshot, view, decision, fast = planned
            if isinstance(decision, LocalReply):
                self._deliver(core.deliver(view, None, Finish(decision, None, 0, None)))
                return
            upstream = self._upstream = decision if isinstance(decision, Upstream) else None
            deadline = self._deadline
            first = None
            sent_at_creation = self._sent
            if sent_at_creation is not None:  # the express attempt, out since ``_open``
                assert upstream is not None
                made, entry, stats, started = sent_at_creation
                call = self._current
                try:  # as a unary ``_attempt`` awaits (only unary calls are sent at creation)
                    response = await call
                except grpc.aio.AioRpcError as error:
                    self._sent = None
                    now = time.monotonic()
                    core.leave(entry, stats, made.limits)  # an error: the call is over
                    attempted = Attempted(
                        outcome_of(error, made.timeout, now - started), error, now
                    )
                    first = (made, attempted)  # not a plain success: the flow takes it on
                except BaseException:
                    self._release_sent()  # cancelled: its call is over now, or when it ends
                    raise
                else:
                    self._sent_answered(response, call)
                    return
            elif fast is not None and not OVERLAY.active:
                # The express way (``inmesh.flow``): the first attempt without the flow,
                # which takes over only if that attempt is not a plain success.
                assert upstream is not None
                sent = express_send(upstream, fast.pick, time.monotonic(), deadline)
                if isinstance(sent, Finish):
                    self._deliver(core.deliver(view, upstream, sent))
                    return
                try:
                    attempted = await self._attempt(upstream, sent)
                except BaseException:
                    express_abandon(upstream, time.monotonic())
                    raise
                finish = express_settle(upstream, sent, attempted)
                if finish is not None:
                    self._deliver(core.deliver(view, upstream, finish))
                    return
                first = (sent, attempted)
            elif (
                upstream is not None
                and upstream.mirror is not None
                and owner._spec.shape == "unary_unary"
                and core.mirror_admit(snapshot)
            ):
                core.mirror(owner._spec, self._request, self._metadata, upstream)
            flow = core.flow(
                snapshot,
                view,
                decision,
                replayable=owner._replayable,
                deadline=deadline,
                first=first,
            )
            try:
                command = next(flow)
                while True:
                    if isinstance(command, Send):
                        command = flow.send(await self._attempt(upstream, command))
                    elif isinstance(command, Wait):
                        await asyncio.sleep(core.wait_seconds(command, deadline))
                        if self._cancelled:
                            raise asyncio.CancelledError
                        command = flow.send(time.monotonic())
                    else:  # Discard: a failed attempt's call has ended already
                        command = flow.send(None)
            except StopIteration as stop:
                finish = stop.value
            finally:
                flow.close()
            self._deliver(core.deliver(view, upstream, finish))
        except asyncio.CancelledError:
            self._cancelled = True
            raise
        except Exception as error:
            self._error = error
        finally:
            self._over()

    def _sent_answered(self, response: Any, call: Any) -> None:
        """The express attempt sent at creation was answered, so with status OK: a plain
        success, recorded as ``inmesh.flow.express_settle`` records one, and delivered."""
        sent, self._sent = self._sent, None
        upstream = self._upstream
        assert sent is not None
        assert upstream is not None
        made, entry, stats, _ = sent
        core = self._owner._core
        core.leave(entry, stats, made.limits)  # the call is over
        express_succeeded(upstream, made.endpoint, time.monotonic())
        if OVERLAY.active and OVERLAY.recording:  # switched on since the call began
            assert self._planned is not None
            finish = Finish(None, (response, call), 1, made.endpoint)
            core.record(self._planned[1], upstream, finish)
        self._deliver((response, call))

    def _over(self) -> None:
        """The call is over: tell whoever waits for it (usually nobody)."""
        if self._ready is None and self._waiters is None and self._callbacks is None:
            self._state = _DONE
        else:
            self._finish()

    def _finish(self) -> None:
        self._state = _DONE
        if self._ready is not None:
            self._ready.set()
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
        callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            self._after(callback)

    async def _wait(self) -> None:
        """Until the flow is done (starting it if nobody has)."""
        self._start()
        if self._state is not _DONE:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter

    def _deliver(self, result: Any) -> None:
        raise NotImplementedError

    def _begin(
        self, upstream: Upstream | None, send: Send, sent: Any = None
    ) -> tuple[Any, Entry[Any], EndpointStats]:
        """Start an attempt's grpc.aio call, holding its endpoint channel and counting it
        active; ``_end`` gives both back. ``sent``: the metadata it sends, when known
        already (an express attempt's); else ``sent_metadata``'s."""
        core = self._owner._core
        limits = send.limits
        try:
            entry, stats = core.enter(upstream, send.endpoint)
        except BaseException:
            if limits is not None:
                limits.release()
            raise
        try:
            callable_ = core.callable(entry, self._owner._spec, upstream)
            if sent is None:
                sent = sent_metadata(self._metadata, upstream, send.attempt)
            if self._extra is _NO_EXTRA:  # grpc.aio's own defaults: fewer arguments to pass
                call = callable_(self._request, timeout=send.timeout, metadata=sent)
            else:
                credentials, wait_for_ready, compression = self._extra
                call = callable_(
                    self._request,
                    timeout=send.timeout,
                    metadata=sent,
                    credentials=credentials,
                    wait_for_ready=wait_for_ready,
                    compression=compression,
                )
        except BaseException:
            core.leave(entry, stats, limits)
            raise
        self._current = call
        if self._ready is not None:
            self._ready.set()
        return call, entry, stats

    def _end(self, call: Any, entry: Entry[Any], stats: EndpointStats, send: Send) -> None:
        """Give back what ``_begin`` took, once: now if the call is over (a unary answer or
        error: the usual case, which saves grpc.aio a callback), else when it ends
        (cancelled, or a stream under way)."""
        core, limits = self._owner._core, send.limits
        if call.done():
            core.leave(entry, stats, limits)
        else:
            call.add_done_callback(lambda _: core.leave(entry, stats, limits))

    async def _attempt(self, upstream: Upstream | None, send: Send) -> Attempted:
        raise NotImplementedError

    async def _finished(self) -> Any:
        """The finished attempt's call, or the error, once the flow is done."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._wait()
        if self._error is not None:
            return self._error
        if self._call is None:  # cancelled before any attempt
            return _cancelled_error()
        return self._call

    # -- grpc.aio.Call

    async def initial_metadata(self) -> Any:
        call = await self._finished()
        if isinstance(call, grpc.aio.AioRpcError):
            return call.initial_metadata()
        metadata = await call.initial_metadata()
        upstream = self._upstream
        if upstream is None or not upstream.response_ops:
            return metadata
        # Answered: the route's response edits apply (to the headers, not the trailers).
        return grpc.aio.Metadata(*edited_initial_metadata(metadata, upstream))

    async def trailing_metadata(self) -> Any:
        call = await self._finished()
        if isinstance(call, grpc.aio.AioRpcError):
            return call.trailing_metadata()
        return await call.trailing_metadata()

    async def code(self) -> Any:
        call = await self._finished()
        if isinstance(call, grpc.aio.AioRpcError):
            return call.code()
        return await call.code()

    async def details(self) -> Any:
        call = await self._finished()
        if isinstance(call, grpc.aio.AioRpcError):
            return call.details()
        return await call.details()

    async def wait_for_connection(self) -> None:
        await self._finished()

    def cancel(self) -> bool:
        if self._state is _DONE:
            call = self._call
            return call is not None and bool(call.cancel())
        self._cancelled = True
        task, state = self._task, self._state  # as they were: the cancel below may start one
        current = self._current
        if current is not None:
            # An express attempt sent at creation (_SENT) with nothing driving the call: its
            # end starts a task that settles the call as cancelled (``_answered``).
            current.cancel()
        if task is not None:
            task.cancel()
            # A task cancelled before its first step never runs its body: end the call.
            task.add_done_callback(self._cancelled_task)
        elif state is _NEW:
            self._finish()
        return True

    def _cancelled_task(self, _task: Any) -> None:
        if self._state is not _DONE:
            # The task was cancelled before its first step, so its body never ran: give
            # back what it would have settled, and end the call.
            self._release_sent()
            self._finish()

    def cancelled(self) -> bool:
        if self._call is not None and self._state is _DONE:
            return bool(self._call.cancelled())
        return self._cancelled

    def done(self) -> bool:
        if self._state is not _DONE:
            return False
        return self._call is None or bool(self._call.done())

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._state is _DONE:
            self._after(callback)
        elif self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def _after(self, callback: Callable[[Any], None]) -> None:
        """Call ``callback(self)`` once the delivered attempt's call is over too."""
        call = self._call
        if call is None or call.done():
            asyncio.get_running_loop().call_soon(callback, self)
        else:
            call.add_done_callback(lambda _: callback(self))

    # -- request streaming

    async def _writer(self) -> Any:
        if self._request is not None:
            raise grpc.aio.UsageError("write() is for calls made without a request iterator")
        assert self._ready is not None
        await self._ready.wait()
        current = self._current
        if current is None:  # answered before any attempt (no route, fault abort, ...)
            await self._finished()
            if self._error is not None:
                raise self._error
            raise asyncio.InvalidStateError("RPC already finished.")
        return current

    async def write(self, request: Any) -> None:
        await (await self._writer()).write(request)

    async def done_writing(self) -> None:
        await (await self._writer()).done_writing()


def _stop(call: Any) -> None:
    """A unary attempt whose await raised anything but its ``AioRpcError`` will not be
    answered: cancel its grpc.aio call, if it is not over. Cancelled, it is over soon
    anyway; but one that grpc.aio failed to start (a request it cannot serialize) would
    never end, and never give back what the attempt holds."""
    if not call.done():
        call.cancel()


def _cancelled_error() -> Any:
    return grpc.aio.AioRpcError(
        _Code.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), cancelled_details()
    )


class _AioUnaryResponseCall(_AioCall, grpc.aio.UnaryUnaryCall, grpc.aio.StreamUnaryCall):  # type: ignore[misc]  # grpc is untyped
    """Unary-unary and stream-unary calls: awaitable for the response."""

    _response: Any = None
    _lazy = True

    def _deliver(self, result: Any) -> None:
        self._response, self._call = result

    async def _attempt(self, upstream: Upstream | None, send: Send) -> Attempted:
        call, entry, stats = self._begin(upstream, send)
        started = time.monotonic()
        try:
            response = await call
        except grpc.aio.AioRpcError as error:
            now = time.monotonic()
            self._owner._core.leave(entry, stats, send.limits)  # an error: the call is over
            return Attempted(outcome_of(error, send.timeout, now - started), error, now)
        except BaseException:
            _stop(call)
            self._end(call, entry, stats, send)  # cancelled: over now, or when it ends
            raise
        self._owner._core.leave(entry, stats, send.limits)  # answered: the call is over
        return _tuple(Attempted, (_OK, (response, call), time.monotonic()))

    def __await__(self) -> Generator[Any, None, Any]:
        if self._state is _SENT:
            # The usual call: awaited with its express attempt out since creation. A plain
            # success, an answer, is settled here without the coroutine ``_run`` costs;
            # an error goes on in ``_run``, which awaits the call again (over: at once).
            self._state = _RUNNING  # the attempt's end must not start a task: this drives
            call = self._current
            try:
                response = yield from call.__await__()
            except grpc.aio.AioRpcError:
                self._state = _SENT
            except BaseException as error:  # cancelled, closed, or grpc.aio's own error
                try:
                    self._release_sent()  # its call is over now, or when it ends
                finally:
                    if isinstance(error, asyncio.CancelledError):
                        self._cancelled = True
                    elif isinstance(error, Exception):
                        self._error = error  # kept, as ``_run`` keeps it: awaited again, raised
                    self._over()
                raise
            else:
                try:
                    self._sent_answered(response, call)
                except Exception as error:
                    self._error = error
                self._over()
                if self._error is not None:
                    raise self._error
                return response
        if self._state is _NEW or self._state is _SENT:
            yield from self._run().__await__()  # inline: a cancellation reaches grpc.aio's call
        else:
            try:
                yield from self._wait().__await__()
            except asyncio.CancelledError:
                # The awaiting task was cancelled (wait_for, a TaskGroup): so is the call,
                # as a grpc.aio call is when the task awaiting its response is.
                self.cancel()
                raise
        if self._cancelled and self._call is None and self._error is None:
            raise asyncio.CancelledError
        if self._error is not None:
            raise self._error
        return self._response


class _AioStreamResponseCall(_AioCall, grpc.aio.UnaryStreamCall, grpc.aio.StreamStreamCall):  # type: ignore[misc]  # grpc is untyped
    """Unary-stream and stream-stream calls: ``read()`` or ``async for``."""

    _first: Any = _NOTHING
    _lazy = False

    def _deliver(self, result: Any) -> None:
        self._call, self._first = result

    async def _attempt(self, upstream: Upstream | None, send: Send) -> Attempted:
        call, entry, stats = self._begin(upstream, send)
        self._end(call, entry, stats, send)  # a stream goes on: its hold goes when it ends
        started = time.monotonic()
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            now = time.monotonic()
            return Attempted(outcome_of(error, send.timeout, now - started), error, now)
        return Attempted(_OK, Started(call, _NOTHING if first is _EOF else first), time.monotonic())

    async def read(self) -> Any:
        await self._wait()
        if self._cancelled and self._call is None and self._error is None:
            raise asyncio.CancelledError
        if self._error is not None:
            raise self._error
        first = self._first
        if first is not _NOTHING:
            self._first = _NOTHING
            return first
        return await self._call.read()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Any]:
        while True:
            message = await self.read()
            if message is _EOF:
                return
            yield message
