"""What every moe-cluster gRPC server shares: message limits, listening, health, reflection,
the interceptors of `moe_core.interceptors`, the port file, and a graceful stop on SIGINT/SIGTERM.

A message over a server's receive limit is answered RESOURCE_EXHAUSTED by grpc itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Awaitable, Callable, Sequence
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


async def serve_until_signal(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    port: int,
    port_file: Path | None,
    grace_s: float,
    drain: Drain | None = None,
    on_stop: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Writes the port file, waits for SIGINT or SIGTERM, then drains, as Kubernetes expects:
    health NOT_SERVING at once (health keeps answering), new calls refused with UNAVAILABLE
    (`drain`), calls in flight given up to grace_s seconds to finish, then `server.stop`.
    on_stop(grace_s) runs beside the drain (other processes of the server draining) and ends
    before the server stops."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    deadline = None
    try:
        if port_file is not None:
            write_port_file(port_file, port)
        await stop.wait()
        deadline = loop.time() + grace_s
        log.info("stopping: draining calls in flight for up to %.1f s", grace_s)
        others = asyncio.ensure_future(on_stop(grace_s)) if on_stop is not None else None
        await health_servicer.enter_graceful_shutdown()
        if drain is not None:
            drain.begin()
            if not await drain.wait_idle(grace_s):
                log.warning(
                    "%d calls still in flight after %.1f s: cutting them", drain.in_flight, grace_s
                )
        if others is not None:
            await others
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        left = grace_s if deadline is None else max(0.0, deadline - loop.time())
        await server.stop(left)
