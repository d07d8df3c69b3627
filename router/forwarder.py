"""A forwarder process: sends the router's Forward calls to expert workers over gRPC, off the
router's interpreter.

`python -m router.forwarder --fd N --fds-fd M`: N and M are ends of two Unix socket pairs whose
other ends the router holds (router.forwarders). Over N come length-prefixed pickled messages:

- ("hello", security, server_name, options): how to reach the workers (first message);
- ("segment", index, size): a host arena segment to map; its memfd was sent just before over M;
- ("call", id, address, timeout_s, header, data, scales, expert_ids, expert_weights, reply):
  one Forward call. header: the request's scalar fields; data/scales: (segment, offset, nbytes)
  of the token rows in the arena; expert_ids/weights: bytes; reply: (segment, offset, capacity)
  where the result rows go;
- ("cancel", id); ("forget", address): the worker left, close its channel; ("stop",).

Back go ("done", id, format, num_tokens, hidden, nbytes, compute_seconds, sent, received,
seconds) once the result rows are in the arena, or ("failed", id, code name, details, sent).
Every call gets exactly one of them, cancelled ones included: until then the router keeps the
call's arena blocks.

Each process runs one asyncio loop with a persistent channel per worker; the router spreads the
workers over several such processes, so encoding, gRPC's copies and decoding run on as many
cores, and the router's own interpreter only plans and launches.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time

import grpc
import numpy as np

from moe_core import ipc, wire
from moe_core.security import Security, make_channel

log = logging.getLogger("router.forwarder")


class Forwarder:
    def __init__(self, sock: socket.socket, fd_sock: socket.socket) -> None:
        self.sock = sock
        self.fd_sock = fd_sock  # blocking; carries only the segments' file descriptors
        self.security = Security()
        self.server_name: str | None = None
        self.options: list | None = None
        self.segments: dict[int, np.ndarray] = {}
        self.channels: dict[str, tuple[grpc.aio.Channel, object]] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        try:
            while True:
                message = await ipc.read_message_async(reader)
                if message is None:
                    return  # the router is gone
                kind = message[0]
                if kind == "call":
                    call_id = message[1]
                    task = loop.create_task(self.call(*message[1:]))
                    self.tasks[call_id] = task
                    task.add_done_callback(lambda _, call_id=call_id: self.tasks.pop(call_id))
                elif kind == "cancel":
                    task = self.tasks.get(message[1])
                    if task is not None:
                        task.cancel()
                elif kind == "segment":
                    self.map_segment(message[1], message[2])
                elif kind == "forget":
                    entry = self.channels.pop(message[1], None)
                    if entry is not None:
                        loop.create_task(entry[0].close(grace=message[2]))
                elif kind == "hello":
                    _, self.security, self.server_name, self.options = message
                elif kind == "stop":
                    return
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            await asyncio.gather(*(ch.close() for ch, _ in self.channels.values()))

    def map_segment(self, index: int, size: int) -> None:
        self.segments[index] = ipc.map_segment(self.fd_sock, size)  # its fd came first

    def view(self, where: tuple[int, int, int]) -> memoryview:
        segment, offset, nbytes = where
        return memoryview(self.segments[segment][offset : offset + nbytes])

    def method(self, address: str):
        entry = self.channels.get(address)
        if entry is None:
            channel = make_channel(address, self.security, self.server_name, self.options)
            entry = (channel, channel.unary_unary(wire.FORWARD_METHOD))
            self.channels[address] = entry
        return entry[1]

    async def call(
        self,
        call_id: int,
        address: str,
        timeout_s: float,
        header: dict,
        data: tuple[int, int, int],
        scales: tuple[int, int, int] | None,
        expert_ids: bytes,
        expert_weights: bytes,
        reply: tuple[int, int, int],
    ) -> None:
        sent = 0
        try:
            request = wire.encode_forward_request(
                **header,
                data=self.view(data),
                scales=None if scales is None else self.view(scales),
                expert_ids=expert_ids,
                expert_weights=expert_weights,
            )
            sent = len(request)
            start = time.perf_counter()
            response = await self.method(address)(request, timeout=timeout_s)
            seconds = time.perf_counter() - start
            view = wire.decode_forward_response(response)
            result = view.result
            nbytes = result.data.nbytes
            if nbytes > reply[2]:
                raise wire.WireError(f"result data has {nbytes} bytes, room for {reply[2]}")
            self.view((reply[0], reply[1], nbytes))[:] = result.data
            self.send(
                (
                    "done",
                    call_id,
                    result.format,
                    result.num_tokens,
                    result.hidden,
                    nbytes,
                    view.compute_seconds,
                    sent,
                    len(response),
                    seconds,
                )
            )
        except grpc.aio.AioRpcError as err:
            self.send(("failed", call_id, err.code().name, err.details() or "", sent))
        except asyncio.CancelledError:
            self.send(("failed", call_id, "CANCELLED", "the call was cancelled", sent))
        except grpc.aio.UsageError as err:
            self.send(("failed", call_id, "UNAVAILABLE", f"the worker left: {err}", sent))
        except wire.WireError as err:
            self.send(("failed", call_id, "INTERNAL", f"bad result: {err}", sent))
        except Exception as err:  # noqa: BLE001 - every call gets an answer
            log.exception("call %d to %s failed", call_id, address)
            self.send(("failed", call_id, "INTERNAL", f"{type(err).__name__}: {err}", sent))

    def send(self, message: tuple) -> None:
        self.writer.write(ipc.pack(message))


def main(argv: list[str] | None = None) -> int:
    return ipc.child_main("router.forwarder", lambda *socks: Forwarder(*socks).run(), argv)


if __name__ == "__main__":
    sys.exit(main())
