"""A front process of an expert worker (`--fronts N`): answers ExpertService calls on the
worker's own port, so that the bytes of the calls are copied by other interpreters than the one
that drives the GPU.

`python -m expert_worker.front --fd N --fds-fd M`, started by the worker process
(expert_worker.fronts), which holds the other ends of the two Unix socket pairs N and M.

The fronts listen on the worker's host:port (SO_REUSEPORT: the kernel spreads the connections
between them; the worker process holds the port without listening), with the same TLS, token
check, health, reflection and drain. A Forward call is
read in place, its token rows and slots copied once into this front's host arena (shared memory
that the worker maps and pins), and handed to the worker as a small message; the worker computes
as for its own calls (same checks, same concurrency limit, same metrics), writes the result rows
into the arena and answers; the front sends the reply. GetInfo is asked of the worker.

Messages (moe_core.ipc) from the worker: ("hello", security, host, port) first, ("done", id,
nbytes, seconds), ("failed", id, code name, message), ("info", id, bytes), ("drain", grace_s).
To the worker: ("ready",) once listening; ("segment", index, size) after the segment's fd went
over M; ("forward", id, request fields, (segment, offset), piece sizes); ("info", id). Every
forward gets exactly one answer: until then its block stays out of the arena, even when the
client gave up.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2

from moe_core import grpc_server, ipc, wire
from moe_core.host_arena import HostArena, Segment
from moe_core.interceptors import Drain
from protos import expert_pb2

log = logging.getLogger("expert_worker.front")

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
_ALIGN = 64  # every piece of a block starts on this boundary (the worker views them as tensors)
_RESULT_ITEMSIZE = {expert_pb2.TOKEN_FORMAT_FP32: 4, expert_pb2.TOKEN_FORMAT_BF16: 2}


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Piece sizes -> (their offsets in a block, the block's size), each piece aligned."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _ALIGN) * _ALIGN
    return offsets, end


class Front:
    def __init__(self, sock: socket.socket, fd_sock: socket.socket) -> None:
        self.sock = sock
        self.fd_sock = fd_sock
        self.arena = HostArena(pin=False, on_new_segment=self._share)
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, asyncio.Future] = {}  # call id -> the worker's answer
        self.ids = itertools.count()

    async def run(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        hello = await ipc.read_message_async(reader)
        if hello is None or hello[0] != "hello":
            raise RuntimeError(f"expected hello from the worker, got {hello!r}")
        _, security, host, port = hello
        drain = Drain(SERVICE_NAME)
        server, _, health_servicer = await grpc_server.start_server(
            self._register,
            SERVICE_NAME,
            host,
            port,
            **security.server_settings(require_client_auth=True),
            drain=drain,
            reuse_port=True,
        )
        self.send(("ready",))
        grace_s = 0.0
        try:
            while (message := await ipc.read_message_async(reader)) is not None:
                if message[0] == "drain":
                    grace_s = message[1]
                    break
                self._answer(message)
            else:
                return  # the worker is gone: nothing can be answered any more
            await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await health_servicer.enter_graceful_shutdown()
            drain.begin()
            # the worker keeps answering while its fronts drain
            reading = asyncio.ensure_future(self._keep_answering(reader))
            await drain.wait_idle(grace_s)
            reading.cancel()
        finally:
            await server.stop(grace_s)
            self.arena.close()

    async def _keep_answering(self, reader) -> None:
        while (message := await ipc.read_message_async(reader)) is not None:
            self._answer(message)

    def _answer(self, message: tuple) -> None:
        """A message from the worker: the end of one forward or info call."""
        future = self.pending.pop(message[1], None)
        if future is not None and not future.done():
            future.set_result(message)

    def _register(self, server: grpc.aio.Server) -> None:
        handlers = {
            "Forward": grpc.unary_unary_rpc_method_handler(self.Forward),
            "GetInfo": grpc.unary_unary_rpc_method_handler(
                self.GetInfo,
                request_deserializer=expert_pb2.WorkerInfoRequest.FromString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def Forward(self, raw: bytes, context):  # noqa: N802 (gRPC's spelling)
        try:
            request = wire.decode_forward_request(raw)
        except wire.WireError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, wire.malformed_forward(err))
        tokens = request.tokens
        data = tokens.data if tokens is not None else memoryview(b"")
        scales = tokens.scales if tokens is not None else memoryview(b"")
        elements = 0 if tokens is None else tokens.num_tokens * tokens.hidden
        if elements > data.nbytes:  # invalid: the worker refuses it before any result
            elements = 0
        reply = elements * _RESULT_ITEMSIZE.get(request.result_format, 0)
        pieces = [data, scales, request.expert_ids, request.expert_weights]
        sizes = [p.nbytes for p in pieces] + [reply]
        offsets, total = layout(sizes)
        block = self.arena.alloc(total)
        for piece, offset in zip(pieces, offsets, strict=False):
            block.view(offset, piece.nbytes)[:] = piece
        fields = (
            request.layer,
            tokens is not None,
            0 if tokens is None else tokens.format,
            0 if tokens is None else tokens.num_tokens,
            0 if tokens is None else tokens.hidden,
            request.slots,
            request.result_format,
        )
        where = (block.segment.index, block.offset)
        asked = self._ask("forward", fields, where, tuple(sizes))
        try:
            answer = await asyncio.shield(asked)
        except asyncio.CancelledError:  # the client left: the block returns once answered
            asked.add_done_callback(lambda _: self.arena.release(block))
            raise
        try:
            if answer[0] == "failed":
                await context.abort(grpc.StatusCode[answer[2]], answer[3])
            _, _, nbytes, seconds = answer
            rows = memoryview(block.view(offsets[4], nbytes))
            return wire.encode_forward_response(
                request.result_format, tokens.num_tokens, tokens.hidden, rows, seconds
            )
        finally:
            self.arena.release(block)

    async def GetInfo(self, request, context):  # noqa: N802
        answer = await self._ask("info")
        if answer[0] == "failed":
            await context.abort(grpc.StatusCode[answer[2]], answer[3])
        return answer[2]  # serialized WorkerInfo: no serializer, the bytes go as they are

    def _ask(self, kind: str, *fields) -> asyncio.Future:
        """Sends one call to the worker -> the future of its answer."""
        call_id = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[call_id] = future
        self.send((kind, call_id, *fields))
        return future

    def send(self, message: tuple) -> None:
        self.writer.write(ipc.pack(message))

    def _share(self, segment: Segment) -> None:
        ipc.send_fd(self.fd_sock, segment.fd)
        self.send(("segment", segment.index, segment.size))


def main(argv: list[str] | None = None) -> int:
    return ipc.child_main("expert_worker.front", lambda *socks: Front(*socks).run(), argv)


if __name__ == "__main__":
    sys.exit(main())
