"""The worker process's side of its front processes (`--fronts N`, expert_worker.front).

The worker starts N fronts on its port (it holds the port but does not listen: every call's bytes
are copied by a front, none by the interpreter that drives the GPU), maps each front's host arena
(pinned with CUDA when the experts are on a GPU), and answers their calls: a forward message
becomes a request read in place from the arena, computed like the worker's own Forward calls
(`ExpertService.forward`: the same checks, concurrency limit and metrics), the result rows
copied from the device straight into the arena; an info message is answered with the serialized
WorkerInfo. A front that dies is started again. On SIGTERM the fronts drain with the worker.

Threads: one reader thread per front hands its messages to the worker's event loop, where the
calls run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import subprocess
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch

from expert_worker import service, wire_forward
from expert_worker.front import layout
from moe_core import ipc, wire
from moe_core.host_arena import register_host, unregister_host
from moe_core.security import Security

if TYPE_CHECKING:
    from expert_worker.server import ExpertService

log = logging.getLogger(__name__)

_RESTART_PAUSE_S = 0.5


class _Front:
    """One front process, its sockets and the arena segments it shared."""

    def __init__(self, index: int, pool: FrontPool) -> None:
        self.index = index
        self.pool = pool
        self.lock = threading.Lock()  # one writer at a time
        self.segments: dict[int, np.ndarray] = {}
        self.ready = threading.Event()
        self.popen, self.control, self.fds = ipc.spawn("expert_worker.front")
        log.info("front process %d started, pid %d", index, self.popen.pid)
        self.send(("hello", pool.security, pool.host, pool.port))
        self.reader = threading.Thread(target=self._read, name=f"front-{index}", daemon=True)
        self.reader.start()

    def send(self, message: tuple) -> None:
        # (a dead front: its reader sees the end and the pool starts another)
        with self.lock, contextlib.suppress(OSError):
            self.control.sendall(ipc.pack(message))

    def _read(self) -> None:
        stream = self.control.makefile("rb")
        try:
            while (message := ipc.read_message(stream)) is not None:
                kind = message[0]
                if kind == "segment":
                    self._map(message[1], message[2])
                elif kind == "ready":
                    self.ready.set()
                else:
                    self.pool.submit(self, message)
        except OSError:
            pass
        finally:
            stream.close()
            code = self.popen.wait()
            self.ready.set()  # (nobody waits for a front that is gone)
            if self.pool.pin:
                # after the calls it handed over: they may still copy from its arena
                self.pool.servicer.after_calls(_unregister_all, list(self.segments.values()))
            self.pool.ended(self, code)

    def _map(self, index: int, size: int) -> None:
        array = ipc.map_segment(self.fds, size)
        if self.pool.pin:
            register_host(array)
        self.segments[index] = array

    def view(self, segment: int, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.segments[segment][offset : offset + nbytes])


class FrontPool:
    def __init__(
        self,
        count: int,
        servicer: ExpertService,
        host: str,
        port: int,
        security: Security,
        pin: bool,
    ) -> None:
        if count < 1:
            raise ValueError(f"fronts must be at least 1, got {count}")
        self.servicer = servicer
        self.host, self.port = host, port
        self.security = security
        self.pin = pin  # the experts are on a GPU: pin the fronts' arenas
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        self.fronts: list[_Front] = [_Front(i, self) for i in range(count)]

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every front listens; OSError when one exits first or takes longer."""
        for front in self.fronts:
            await asyncio.to_thread(front.ready.wait, timeout_s)
            code = front.popen.poll()
            if code is not None or not front.ready.is_set():
                how = (
                    f"exited with status {code}"
                    if code is not None
                    else f"took over {timeout_s:.0f} s"
                )
                raise OSError(
                    f"front process {front.index} {how} before listening on port {self.port} "
                    "(its own error is logged above)"
                )

    async def drain(self, grace_s: float) -> None:
        """Each front drains (health NOT_SERVING, new calls refused, calls in flight finish
        within grace_s), then exits; the worker keeps computing for them meanwhile."""
        self.stopping = True
        for front in self.fronts:
            front.send(("drain", grace_s))
        for front in self.fronts:
            try:
                await asyncio.to_thread(front.popen.wait, grace_s + 5.0)
            except subprocess.TimeoutExpired:
                log.warning("front process %d did not stop in time: killed", front.index)
                front.popen.kill()

    def submit(self, front: _Front, message: tuple) -> None:
        """On a reader thread: a front's call runs on the worker's event loop."""
        kind = message[0]
        handle = self._forward if kind == "forward" else self._info
        asyncio.run_coroutine_threadsafe(handle(front, *message[1:]), self.loop)

    def ended(self, front: _Front, code: int) -> None:
        """On a reader thread: a front exited; another takes its place unless stopping."""
        if self.stopping:
            return
        log.error("front process %d exited with %s; starting it again", front.index, code)
        self.loop.call_soon_threadsafe(
            self.loop.call_later, _RESTART_PAUSE_S, self._restart, front.index
        )

    def _restart(self, index: int) -> None:
        if not self.stopping:
            self.fronts[index] = _Front(index, self)

    async def _forward(self, front: _Front, call_id: int, fields, where, sizes) -> None:
        layer, has_tokens, fmt, num_tokens, hidden, slots, result_format = fields
        segment, base = where
        offsets, _ = layout(list(sizes))
        data, scales, ids, weights, reply = (
            front.view(segment, base + offset, size)
            for offset, size in zip(offsets, sizes, strict=True)
        )
        tokens = wire.TokenBatchView(fmt, num_tokens, hidden, data, scales) if has_tokens else None
        request = wire.ForwardRequestView(layer, tokens, slots, ids, weights, result_format)
        out = torch.from_numpy(np.frombuffer(reply, dtype=np.uint8))
        try:
            # the front keeps the block until the answer: the tokens are read where they are
            rows, seconds = await self.servicer.forward(
                functools.partial(wire_forward.forward_rows, in_place=True),
                request,
                self.servicer.metrics,
                out,
            )
        except service.RequestError as err:
            front.send(("failed", call_id, err.code.name, err.message))
            return
        front.send(("done", call_id, rows.numel() * rows.element_size(), seconds))

    async def _info(self, front: _Front, call_id: int) -> None:
        try:
            info = await self.servicer.run("GetInfo", service.worker_info)
        except service.RequestError as err:
            front.send(("failed", call_id, err.code.name, err.message))
            return
        front.send(("info", call_id, info.SerializeToString()))


def _unregister_all(arrays: list[np.ndarray]) -> None:
    for array in arrays:
        unregister_host(array)
