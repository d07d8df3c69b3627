"""What every moe-cluster gRPC server shares: message limits, listening, health, reflection,
the port file, and a graceful stop on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Used by servers and by the router's channels to the workers.
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
    register: Callable[[grpc.aio.Server], None], service_name: str, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts a server with `register`'s servicers, health and reflection on host:port.

    port 0 picks a free port. Returns (server, bound port, health servicer); health reports
    SERVING for "" and service_name once this returns. Raises OSError when it cannot listen.
    """
    # no SO_REUSEPORT: a second server on a taken port must fail, not share its traffic
    server = grpc.aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [service_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = listen_address(host, port)
    try:
        bound = server.add_insecure_port(address)
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
) -> None:
    """Writes the port file, waits for SIGINT or SIGTERM, then drains: health NOT_SERVING,
    then `server.stop(grace_s)` (calls in flight get grace_s seconds to finish)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if port_file is not None:
            write_port_file(port_file, port)
        await stop.wait()
        log.info("stopping: draining calls in flight for up to %.1f s", grace_s)
        await health_servicer.enter_graceful_shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(grace_s)
