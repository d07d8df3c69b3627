"""What the transports that keep a layer's bytes in a host arena share: forwarder processes
(router.forwarders) and the native client (router.native_transport).

Such a transport stages the layer's token rows into arena blocks that the dispatch handle holds
until `finish` (or until it is dropped after a failed step); each call holds its request rows
while they are being sent and its reply block until its answer is in; the blocks return once the
device has finished its copies from them.
"""

from __future__ import annotations

import concurrent.futures
import weakref
from typing import TYPE_CHECKING

import grpc
import torch

from moe_core.host_arena import Block, HostArena

if TYPE_CHECKING:
    from router.calls import Request
    from router.dispatch import DispatchHandle, WireTokens

REPLY_SLACK_BYTES = 64  # an ExpertForwardResponse's bytes beyond its result rows (headers)


class CallError(Exception):
    """A call ended with a gRPC status other than OK. local: the router's side failed (e.g. a
    forwarder process died), not the worker, so the worker stays in routing."""

    def __init__(self, code: grpc.StatusCode, details: str, local: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.local = local


class ArenaHolds:
    """The blocks of one arena that dispatch handles hold. Model thread only."""

    def __init__(self, arena: HostArena) -> None:
        self.arena = arena

    def call_blocks(
        self, handle: DispatchHandle, request: Request, reply_slack: int = 0
    ) -> tuple[Block, Block]:
        """-> (the staged block of the request's rows, a block for its reply's rows plus
        reply_slack bytes), each with one more holder: the call."""
        return self._request_block(handle, request), self._reply_block(handle, request, reply_slack)

    def stage(
        self, tokens: WireTokens, index: torch.Tensor, handle: DispatchHandle
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """WireTokens.stage into a block the handle holds: (data [N, d], scales [N, s] or
        None), uint8."""
        n, d = index.numel(), tokens.data.shape[1]
        s = 0 if tokens.scales is None else tokens.scales.shape[1]
        block = self.arena.alloc(n * (d + s))
        self.hold_for(handle, block)
        raw = block.tensor()
        data = raw[: n * d].view(n, d)
        scales = None if tokens.scales is None else raw[n * d : n * (d + s)].view(n, s)
        tokens.stage(index, out=(data, scales))
        return data, scales

    def _reply_block(self, handle: DispatchHandle, request: Request, slack: int = 0) -> Block:
        """A block for a call's result rows (plus slack bytes), held by the call and the
        handle."""
        rows = request.num_tokens * request.hidden * request.result_itemsize
        block = self.arena.alloc(rows + slack, holders=2)
        self.hold_for(handle, block)
        return block

    def _request_block(self, handle: DispatchHandle, request: Request) -> Block:
        """The staged block that holds the request's rows, with one more holder: the call."""
        block = self._block_of(handle, request.data)
        self.arena.hold(block)
        return block

    def hold_for(self, handle: DispatchHandle, block: Block) -> None:
        """The handle holds the block until `finish`, or until it is dropped without one (a
        step that failed between dispatch and combine): its blocks return then."""
        if not handle.host_blocks:
            weakref.finalize(handle, release_all, self.arena, handle.host_blocks)
        handle.host_blocks.append(block)

    def finish(self, handle: DispatchHandle) -> None:
        """The handle is done: its blocks return once the device has read them."""
        event = None
        if self.arena.pin:
            event = torch.cuda.Event()
            event.record()
        release_all(self.arena, handle.host_blocks, event)

    def _block_of(self, handle: DispatchHandle, t: torch.Tensor) -> Block:
        segment, offset = self.arena.locate(t)
        for block in handle.host_blocks:
            inside = block.offset <= offset < block.offset + block.nbytes
            if block.segment.index == segment and inside:
                return block
        raise ValueError("the request's rows were not staged for this handle")


class ArenaTransport:
    """A `Transport` whose token rows and result rows live in `holds`'s arena (the subclass
    makes it): it stages into the arena, and result rows stay there until `finish`."""

    results_held = True
    holds: ArenaHolds

    def stage(
        self, tokens: WireTokens, index: torch.Tensor, handle: DispatchHandle
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.holds.stage(tokens, index, handle)

    def finish(self, handle: DispatchHandle) -> None:
        self.holds.finish(handle)


def release_all(arena: HostArena, blocks: list[Block], event=None) -> None:
    for block in blocks:
        arena.release(block, event)
    blocks.clear()


def settle(future: concurrent.futures.Future, result=None, error: Exception | None = None) -> None:
    """Ends a call's future unless it already ended (cancelled meanwhile)."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
