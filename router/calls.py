"""Forward calls to expert workers, and the transport that sends them on the router's event loop.

A `ForwardCall` is one request to one worker: some of a layer's token rows (already on the
host) with their routing slots. Its future ends with the worker's answer read in place
(`wire.ForwardResponseView`) or with the failure. Three transports send calls:
`LoopTransport` (here: the router's own event loop and channels), with `--forwarders N`
`router.forwarders.ForwarderPool` (other processes), and with `--transport native`
`router.native_transport.NativeTransport` (gRPC C++ threads).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from moe_core import wire

if TYPE_CHECKING:
    from router.dispatch import DispatchHandle, WireTokens, WorkerPlan
    from router.metrics import RouterMetrics
    from router.workers import Worker


@dataclass(eq=False)
class Request:
    """One ExpertForwardRequest, its token rows in host memory."""

    layer: int
    token_format: int
    result_format: int
    result_itemsize: int
    data: torch.Tensor  # [n, row bytes] uint8
    scales: torch.Tensor | None  # [n, scale bytes] uint8 (fp8) or None
    expert_ids: torch.Tensor  # [n, S] int32
    expert_weights: torch.Tensor  # [n, S] float32
    hidden: int

    @property
    def num_tokens(self) -> int:
        return self.data.shape[0]

    def header(self) -> dict:
        """The scalar fields of `wire.encode_forward_request`."""
        return {
            "layer": self.layer,
            "token_format": self.token_format,
            "num_tokens": self.num_tokens,
            "hidden": self.hidden,
            "slots": self.expert_ids.shape[1],
            "result_format": self.result_format,
        }

    def encode(self) -> bytes:
        return b"".join(self.parts())

    def parts(self) -> list[wire.Buffer]:
        """The serialized request as buffers in order, the rows' host memory uncopied."""
        return wire.forward_request_parts(
            **self.header(),
            data=host_view(self.data),
            scales=None if self.scales is None else host_view(self.scales),
            expert_ids=host_view(self.expert_ids),
            expert_weights=host_view(self.expert_weights),
        )


@dataclass(eq=False)
class ForwardCall:
    plan: WorkerPlan  # rows are rows of the handle's x
    worker: Worker
    request: Request
    attempt: int  # 1 for the first send of these rows
    index: torch.Tensor  # plan.rows on the result's device
    transport: Transport  # what sends it
    # -> wire.ForwardResponseView, or the failure; set by the transport
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    task: asyncio.Task | None = None  # LoopTransport: the call on the event loop, once started


class Transport(Protocol):
    """How a layer's calls travel. Used from the model's thread."""

    results_held: bool  # result rows stay in host memory of the transport until `finish`

    def stage(
        self, tokens: WireTokens, index: torch.Tensor, handle: DispatchHandle
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rows index [N] of the tokens on the host: (data [N, d], scales [N, s] or None)."""
        ...

    def submit(
        self, handle: DispatchHandle, calls: list[ForwardCall], timeout_s: float
    ) -> None: ...

    def cancel(self, calls: list[ForwardCall]) -> None: ...

    def finish(self, handle: DispatchHandle) -> None:
        """The handle's calls are over and combine has queued its last use of their rows."""
        ...


class LoopTransport:
    """Calls made on the router's event loop with the worker pool's channels."""

    results_held = False

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: RouterMetrics | None) -> None:
        self.loop = loop
        self.metrics = metrics
        # worker -> its Forward method taking and returning raw bytes; used on the event loop
        self._methods: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def stage(self, tokens, index, handle):
        return tokens.stage(index)

    def submit(self, handle, calls, timeout_s) -> None:
        self.loop.call_soon_threadsafe(self._start, calls, timeout_s)  # one wake-up per layer

    def cancel(self, calls) -> None:
        self.loop.call_soon_threadsafe(_cancel_calls, calls)

    def finish(self, handle) -> None:
        pass

    def _start(self, calls: list[ForwardCall], timeout_s: float) -> None:
        """On the event loop: starts every call (concurrently); each settles its future."""
        for call in calls:
            if call.future.set_running_or_notify_cancel():  # False: cancelled meanwhile
                call.task = self.loop.create_task(self._forward(call, timeout_s))
                call.task.add_done_callback(lambda task, call=call: _settle(call, task))

    async def _forward(self, call: ForwardCall, timeout_s: float) -> wire.ForwardResponseView:
        """On the event loop (gRPC's call objects belong to the loop that creates them): one
        Forward call, its request encoded here -> the response read in place."""
        worker = call.worker
        method = self._methods.get(worker)
        if method is None:  # no serializers: the channel sends and returns raw bytes
            method = worker.channel.unary_unary(wire.FORWARD_METHOD)
            self._methods[worker] = method
        request = call.request.encode()
        pending = method(request, timeout=timeout_s)
        if self.metrics is None:
            response = await pending
        else:
            response = await self.metrics.observe_call(worker.address, len(request), pending)
        return wire.decode_forward_response(response)


def host_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous host tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _settle(call: ForwardCall, task: asyncio.Task) -> None:
    """On the event loop: hands a finished call's outcome to the model's thread."""
    if task.cancelled():
        call.future.set_exception(concurrent.futures.CancelledError())
    elif task.exception() is not None:
        call.future.set_exception(task.exception())
    else:
        call.future.set_result(task.result())


def _cancel_calls(calls: list[ForwardCall]) -> None:
    for call in calls:
        if call.task is not None:
            call.task.cancel()
