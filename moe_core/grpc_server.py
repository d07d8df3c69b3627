"""What every moe-cluster gRPC server shares: message limits, listening, health, reflection,
the interceptors of `moe_core.interceptors`, the port file, and a graceful stop on SIGINT/SIGTERM.

A message over a server's receive limit is answered RESOURCE_EXHAUSTED by grpc itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moe_core.interceptors import Drain, RejectMalformed

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # servers' send limit; workers' receive limit
# The router's channels to the workers.
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_ids(ids) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (for logs and messages)."""
    spans: list[list[int]] = []
    for i in sorted(ids):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans) or "none"


async def start_server(
    register: Callable[[grpc.aio.Server], None],
    service_name: str,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    drain: Drain | None = None,
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts a server with `register`'s servicers, health and reflection on host:port.

    port 0 picks a free port; credentials None serves plaintext; interceptors see every call first
    (e.g. the bearer-token check of `moe_core.auth`), then `drain` (given to `serve_until_signal`
    too), which counts calls and refuses them once stopping. Malformed requests to service_name
    are answered INVALID_ARGUMENT; requests over max_receive_bytes get RESOURCE_EXHAUSTED.
    Returns (server, bound port, health servicer); health reports SERVING for "" and
    service_name once this returns. Raises OSError when it cannot listen. reuse_port: other
    servers of this process's own (an expert worker's fronts) may listen on the same port, and
    the kernel spreads the connections between them; otherwise a taken port fails.
    """
    # the token check first: an unauthenticated call reaches nothing else
    interceptors = [
        *interceptors,
        *([drain] if drain is not None else []),
        RejectMalformed(service_name),
    ]
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = listen_address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err}") from err
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in (health.OVERALL_HEALTH, service_name):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def write_port_file(path: Path, port: int) -> None:
    """Writes `port` and a newline to path atomically (a temp file in the same folder, renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def reserved_port(host: str, port: int) -> Iterator[int]:
    """Holds host:port (0 = a free port) with a bound socket that does not listen -> the port.

    The socket has SO_REUSEPORT, as have the servers that then listen there (an expert worker's
    fronts): they take every connection, and a server started again later binds the same port.
    OSError naming the address when the host does not resolve or the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise OSError(f"cannot listen on {listen_address(host, port)}: {err}") from err
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:  # as grpc binds [::]: IPv4 too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind(address)
        except OSError as err:
            raise OSError(f"cannot listen on {listen_address(host, port)}: {err}") from err
        yield sock.getsockname()[1]


@contextlib.asynccontextmanager
async def stop_signal() -> AsyncIterator[asyncio.Event]:
    """An event set by SIGINT or SIGTERM while the context lasts (a second one changes
    nothing: the stop goes on)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    port: int,
    port_file: Path | None,
    grace_s: float,
    drain: Drain | None = None,
) -> None:
    """Writes the port file, waits for SIGINT or SIGTERM, then drains, as Kubernetes expects:
    health NOT_SERVING at once (health keeps answering), new calls refused with UNAVAILABLE
    (`drain`), calls in flight given up to grace_s seconds to finish, then `server.stop`."""
    loop = asyncio.get_running_loop()
    deadline = None
    try:
        async with stop_signal() as stop:
            if port_file is not None:
                write_port_file(port_file, port)
            await stop.wait()
            deadline = loop.time() + grace_s
            log.info("stopping: draining calls in flight for up to %.1f s", grace_s)
            await health_servicer.enter_graceful_shutdown()
            if drain is not None:
                drain.begin()
                if not await drain.wait_idle(grace_s):
                    log.warning(
                        "%d calls still in flight after %.1f s: cutting them",
                        drain.in_flight,
                        grace_s,
                    )
    finally:
        left = grace_s if deadline is None else max(0.0, deadline - loop.time())
        await server.stop(left)
