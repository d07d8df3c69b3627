"""The router's Forward calls sent by forwarder processes (`--forwarders N`).

In process, every byte a layer sends and receives crosses the router's one Python interpreter
several times (encoding, gRPC's copies into and out of its slices, decoding), and the event loop
doing it shares the GIL with the model's thread. With forwarders, the router stages each layer's
token rows into a host arena shared with N forwarder processes (router.forwarder), pinned for
the GPU, and only sends each call's small header over a Unix socket; the process that owns the
worker encodes the request from the arena, makes the gRPC call on its own channel, and writes the
result rows back into the arena, from where they go to the GPU by DMA. The router's interpreter
no longer touches the token bytes.

A worker's calls take the processes in turn, each on its own connection (so a worker with front
processes, `expert_worker serve --fronts`, gets them on several of its processes). A forwarder
process that dies fails its calls in flight (UNAVAILABLE: they are sent again like any failed
call) and is started again at the next call.

Threads: `stage`, `submit`, `cancel` and `finish` run on the model's thread; one reader thread
per process settles the calls' futures.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import subprocess
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from moe_core import ipc, wire
from moe_core.host_arena import Block, HostArena, Segment
from moe_core.security import Security
from router.arena_calls import ArenaHolds, ArenaTransport, CallError, settle

if TYPE_CHECKING:
    from router.calls import ForwardCall
    from router.dispatch import DispatchHandle
    from router.metrics import RouterMetrics

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Pending:
    call: ForwardCall
    request_block: Block
    reply_block: Block


class _Process:
    """One forwarder process, its sockets and the calls in flight through it."""

    def __init__(self, index: int, pool: ForwarderPool) -> None:
        self.index = index
        self.pool = pool
        self.lock = threading.Lock()  # one writer at a time on the sockets
        self.pending: dict[int, _Pending] = {}
        self.popen, self.control, self.fds = ipc.spawn("router.forwarder")
        log.info("forwarder process %d started, pid %d", index, self.popen.pid)
        self.alive = True
        self._send_locked(("hello", pool.security, pool.server_name, pool.options))
        for segment in pool.arena.segments:
            self._share_locked(segment)
        self.reader = threading.Thread(
            target=self._read, name=f"forwarder-{index}-reader", daemon=True
        )
        self.reader.start()

    def send(self, message: tuple) -> bool:
        with self.lock:
            if not self.alive:
                return False
            try:
                self._send_locked(message)
            except OSError:
                return False
            return True

    def share(self, segment: Segment) -> None:
        with self.lock:
            if self.alive:
                with contextlib.suppress(OSError):  # it died: its reader fails its calls
                    self._share_locked(segment)

    def _send_locked(self, message: tuple) -> None:
        self.control.sendall(ipc.pack(message))

    def _share_locked(self, segment: Segment) -> None:
        ipc.send_fd(self.fds, segment.fd)
        self._send_locked(("segment", segment.index, segment.size))

    def _read(self) -> None:
        stream = self.control.makefile("rb")
        try:
            while (message := ipc.read_message(stream)) is not None:
                self.pool._settle(self, message)
        except (OSError, ValueError):
            pass
        finally:
            stream.close()
            with self.lock:
                self.alive = False
                orphans, self.pending = list(self.pending.values()), {}
            code = self.popen.wait()
            if not self.pool.closing:
                log.error("forwarder process %d exited with %s", self.index, code)
            for pending in orphans:
                self.pool._fail(
                    pending,
                    grpc.StatusCode.UNAVAILABLE,
                    f"forwarder process {self.index} exited with {code}",
                    local=True,
                )

    def stop(self) -> None:
        self.send(("stop",))
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        self.reader.join(timeout=10)
        self.control.close()
        self.fds.close()


class ForwarderPool(ArenaTransport):
    """N forwarder processes and the arena they share with the router: a `Transport`."""

    def __init__(
        self,
        processes: int,
        security: Security | None,
        server_name: str | None,
        options: list | None,
        pin: bool,
        metrics: RouterMetrics | None = None,
    ) -> None:
        if processes < 1:
            raise ValueError(f"forwarder processes must be at least 1, got {processes}")
        self.security = security or Security()
        self.server_name = server_name
        self.options = options
        self.metrics = metrics
        self.closing = False
        self.arena = HostArena(pin=pin, on_new_segment=self._share)
        self.holds = ArenaHolds(self.arena)
        self._lock = threading.Lock()
        self._processes: list[_Process | None] = [None] * processes
        self._turns: dict[str, int] = {}  # worker address -> the process its next call takes
        self._ids = itertools.count()
        for index in range(processes):
            self._process(index)

    # -- the model's thread ------------------------------------------------------------------

    def submit(self, handle: DispatchHandle, calls: list[ForwardCall], timeout_s: float) -> None:
        for call in calls:
            if not call.future.set_running_or_notify_cancel():
                continue
            request = call.request
            source, reply = self.holds.call_blocks(handle, request)
            pending = _Pending(call, source, reply)
            process_index = self._next_process(call.worker.address)
            message = (
                call.worker.address,
                timeout_s,
                request.header(),
                self._where(request.data),
                None if request.scales is None else self._where(request.scales),
                request.expert_ids.numpy().tobytes(),
                request.expert_weights.numpy().tobytes(),
                (reply.segment.index, reply.offset, reply.nbytes),
            )
            self._send_call(process_index, pending, message)

    def cancel(self, calls: list[ForwardCall]) -> None:
        wanted = {id(call) for call in calls}
        with self._lock:
            processes = [p for p in self._processes if p is not None]
        for process in processes:
            with process.lock:
                ids = [i for i, p in process.pending.items() if id(p.call) in wanted]
            for call_id in ids:
                process.send(("cancel", call_id))

    def forget(self, address: str, grace_s: float) -> None:
        """The worker left: every process closes its channel to it (after grace_s for the calls
        already on their way)."""
        with self._lock:
            self._turns.pop(address, None)
            processes = [p for p in self._processes if p is not None]
        for process in processes:
            process.send(("forget", address, grace_s))

    def close(self) -> None:
        self.closing = True
        with self._lock:
            processes, self._processes = self._processes, [None] * len(self._processes)
        for process in processes:
            if process is not None:
                process.stop()
        self.arena.close()

    # -- internals ---------------------------------------------------------------------------

    def _send_call(self, process_index: int, pending: _Pending, message: tuple) -> None:
        for _ in range(2):  # a dead process is started again once
            process = self._process(process_index)
            call_id = next(self._ids)
            with process.lock:
                if process.alive:
                    process.pending[call_id] = pending
                    try:
                        process._send_locked(("call", call_id, *message))
                        return
                    except OSError:
                        process.pending.pop(call_id, None)
        details = "no forwarder process could take the call"
        self._fail(pending, grpc.StatusCode.UNAVAILABLE, details, local=True)

    def _process(self, index: int) -> _Process:
        with self._lock:
            process = self._processes[index]
            if process is None or (not process.alive and not self.closing):
                if process is not None:
                    log.warning("starting forwarder process %d again", index)
                process = _Process(index, self)
                self._processes[index] = process
                if self.metrics is not None:
                    self.metrics.record_forwarder_start()
            return process

    def _next_process(self, address: str) -> int:
        """A worker's calls take the processes in turn (each has its own connection to the
        worker: a worker with fronts gets its calls on several of them)."""
        with self._lock:
            turn = self._turns.get(address, len(self._turns))
            self._turns[address] = turn + 1
            return turn % len(self._processes)

    def _share(self, segment: Segment) -> None:
        if self.metrics is not None:
            self.metrics.set_host_arena_bytes(self.arena.nbytes)
        with self._lock:
            processes = [p for p in self._processes if p is not None]
        for process in processes:
            process.share(segment)

    def _where(self, t: torch.Tensor) -> tuple[int, int, int]:
        segment, offset = self.arena.locate(t)
        return segment, offset, t.numel() * t.element_size()

    def _settle(self, process: _Process, message: tuple) -> None:
        """On a reader thread: one call's answer."""
        kind, call_id = message[0], message[1]
        with process.lock:
            pending = process.pending.pop(call_id, None)
        if pending is None:
            return
        address = pending.call.worker.address
        if kind == "done":
            _, _, fmt, num_tokens, hidden, nbytes, compute_s, sent, received, seconds = message
        else:
            _, _, code_name, details, sent = message
        if self.metrics is not None and sent:
            self.metrics.record_dispatch(address, sent)
        if kind == "done":
            data = pending.reply_block.tensor()[:nbytes].numpy()
            view = wire.ForwardResponseView(
                wire.TokenBatchView(fmt, num_tokens, hidden, memoryview(data), memoryview(b"")),
                compute_s,
            )
            if self.metrics is not None:
                self.metrics.record_combine(address, received, seconds)
            self._end(pending)
            settle(pending.call.future, result=view)
        else:
            self._fail(pending, grpc.StatusCode[code_name], details)

    def _fail(
        self, pending: _Pending, code: grpc.StatusCode, details: str, local: bool = False
    ) -> None:
        if self.metrics is not None and code is not grpc.StatusCode.CANCELLED and not local:
            self.metrics.record_worker_failure(pending.call.worker.address, code)
        self._end(pending)
        settle(pending.call.future, error=CallError(code, details, local))

    def _end(self, pending: _Pending) -> None:
        self.arena.release(pending.request_block)
        self.arena.release(pending.reply_block)
