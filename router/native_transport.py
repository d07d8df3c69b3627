"""The router's Forward calls on the native gRPC client (`--transport native`).

With the router's event loop, every byte of a layer crosses the interpreter several times
(encoding, gRPC's Python layer copying the message into its slices and each received slice into
Python bytes), and the loop doing it shares the GIL with the model's thread. Here the layer's
token rows are staged into a pinned host arena, each request goes to gRPC C++ as slices over
that memory (small headers, the rows, the routing slots: no copy), and each reply is copied
once, on one of gRPC's threads, into an arena block from where its rows go to the device by
DMA. The interpreter only starts calls and hands their outcomes to the futures: a poller thread
waits in the library (without the GIL) and settles each call that ends.

The wire is the same gRPC as the event loop's (same method, same bytes, TLS and bearer tokens
alike), so workers see no difference. Each worker gets `connections` channels of its own, which
its calls take in turn (a worker with front processes gets them on several of its processes).

Threads: `stage`, `submit`, `cancel` and `finish` run on the model's thread; the poller settles
futures and releases blocks; `forget` comes from the worker pool.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from moe_core import wire
from moe_core.auth import bearer_metadata
from moe_core.host_arena import Block, HostArena
from moe_core.security import Security
from router.arena_calls import REPLY_SLACK_BYTES, ArenaHolds, ArenaTransport, CallError, settle
from router.native import FINISHED, NativeClient

if TYPE_CHECKING:
    from router.calls import ForwardCall
    from router.dispatch import DispatchHandle
    from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

_METHOD = wire.FORWARD_METHOD.encode()
_POLL_S = 0.5  # the poller's longest wait; it wakes sooner for every event


@dataclass(eq=False)
class _Pending:
    call: ForwardCall
    request_block: Block
    reply_block: Block
    parts: list[np.ndarray]  # the request's buffers: alive until RELEASED
    sent: int
    started: float = field(default_factory=time.perf_counter)
    finished: bool = False
    released: bool = False


class NativeTransport(ArenaTransport):
    """Calls made by gRPC C++ from a pinned host arena: a `Transport`."""

    def __init__(
        self,
        security: Security | None,
        server_name: str | None,
        pin: bool,
        metrics: RouterMetrics | None = None,
        connections: int = 1,
    ) -> None:
        if connections < 1:
            raise ValueError(f"connections per worker must be at least 1, got {connections}")
        self.security = security or Security()
        self.server_name = server_name
        self.metrics = metrics
        self.connections = connections
        self.client = NativeClient()
        self.arena = HostArena(pin=pin, on_new_segment=self._grown)
        self.holds = ArenaHolds(self.arena)
        self._lock = threading.Lock()  # channels, turns, pending
        self._channels: dict[str, list[int]] = {}  # worker address -> its channel ids
        self._turns: dict[str, itertools.count] = {}
        self._pending: dict[int, _Pending] = {}  # native call id -> its call
        self._closed = False
        self._poller = threading.Thread(target=self._poll, name="native-calls", daemon=True)
        self._poller.start()

    # -- the model's thread ------------------------------------------------------------------

    def submit(self, handle: DispatchHandle, calls: list[ForwardCall], timeout_s: float) -> None:
        for call in calls:
            if not call.future.set_running_or_notify_cancel():
                continue
            source, reply = self.holds.call_blocks(handle, call.request, REPLY_SLACK_BYTES)
            parts = [np.frombuffer(part, dtype=np.uint8) for part in call.request.parts()]
            pending = _Pending(call, source, reply, parts, sum(p.nbytes for p in parts))
            buffers = [(p.ctypes.data, p.nbytes) for p in parts]
            target = (reply.view().ctypes.data, reply.nbytes)
            with self._lock:  # the poller looks the call up under the lock
                if self._closed:
                    self._end(pending, None, grpc.StatusCode.CANCELLED, "the router is closing")
                    continue
                channel = self._channel(call.worker.address)
                call_id = self.client.call(channel, _METHOD, buffers, target, timeout_s)
                self._pending[call_id] = pending

    def cancel(self, calls: list[ForwardCall]) -> None:
        wanted = {id(call) for call in calls}
        with self._lock:
            ids = [i for i, p in self._pending.items() if id(p.call) in wanted and not p.finished]
        for call_id in ids:
            self.client.cancel(call_id)

    # -- the worker pool ---------------------------------------------------------------------

    def forget(self, address: str, grace_s: float) -> None:
        """The worker left: its channels close after grace_s (calls under way end first)."""
        with self._lock:
            channels = self._channels.pop(address, [])
            self._turns.pop(address, None)
        if channels:
            timer = threading.Timer(grace_s, self._close_channels, (channels,))
            timer.daemon = True
            timer.start()

    def close(self) -> None:
        """Cancels the calls under way, waits for their ends and frees the arena."""
        with self._lock:
            self._closed = True
        if not self.client.shutdown(timeout_s=10.0):
            log.error("native gRPC calls did not end within 10 s of the shutdown")
        self._poller.join(timeout=10.0)
        self.client.free()
        self.arena.close()

    # -- internals ---------------------------------------------------------------------------

    def _channel(self, address: str) -> int:
        """The next of the worker's channels (made at its first call); the lock is held."""
        channels = self._channels.get(address)
        if channels is None:
            channels = [self._connect(address) for _ in range(self.connections)]
            self._channels[address] = channels
            self._turns[address] = itertools.count()
        return channels[next(self._turns[address]) % len(channels)]

    def _connect(self, address: str) -> int:
        identity, token = self.security.identity, self.security.token
        return self.client.channel(
            address,
            root_certs=None if identity is None else identity.ca,
            cert_chain=None if identity is None else identity.cert_chain,
            private_key=None if identity is None else identity.private_key,
            server_name=self.server_name,
            metadata=() if token is None else bearer_metadata(token),
        )

    def _close_channels(self, channels: list[int]) -> None:
        for channel in channels:
            self.client.close_channel(channel)

    def _grown(self, _segment) -> None:
        if self.metrics is not None:
            self.metrics.set_host_arena_bytes(self.arena.nbytes)

    def _poll(self) -> None:
        """The poller thread: settles each call that finishes; frees its request rows once
        gRPC no longer reads them."""
        while (events := self.client.poll(_POLL_S)) is not None:
            for call_id, kind in events:
                with self._lock:
                    pending = self._pending.get(call_id)
                    if pending is None:
                        continue
                    if kind == FINISHED:
                        pending.finished = True
                    else:
                        pending.released = True
                    if pending.finished and pending.released:
                        del self._pending[call_id]
                if kind == FINISHED:
                    outcome = self.client.take(call_id)
                    self._end(pending, outcome.reply_len, outcome.code, outcome.details)
                else:
                    self.arena.release(pending.request_block)
                    pending.parts = []

    def _end(
        self, pending: _Pending, reply_len: int | None, code: grpc.StatusCode, details: str
    ) -> None:
        """The call finished with code: its future gets the reply read in place, or the error.
        reply_len None: the call never started, so its request rows are given back here too."""
        if reply_len is None:
            self.arena.release(pending.request_block)
        view = None
        if code is grpc.StatusCode.OK:
            reply = memoryview(pending.reply_block.view(0, reply_len))
            try:
                view = wire.decode_forward_response(reply)
            except wire.WireError as err:
                code, details = grpc.StatusCode.INTERNAL, f"bad reply: {err}"
        self.arena.release(pending.reply_block)  # the call's hold; the handle's stays
        if self.metrics is not None and reply_len is not None:
            address = pending.call.worker.address
            self.metrics.record_dispatch(address, pending.sent)
            if view is not None:
                seconds = time.perf_counter() - pending.started
                self.metrics.record_combine(address, reply_len, seconds)
            elif code is not grpc.StatusCode.CANCELLED:
                self.metrics.record_worker_failure(address, code)
        if view is None:
            settle(pending.call.future, error=CallError(code, details))
        else:
            settle(pending.call.future, result=view)
