"""The expert worker's gRPC server: ExpertService, health and reflection on one asyncio server.

The servicer only adapts: it runs `service.forward` / `service.worker_info` on the shard's own
thread (so the event loop keeps answering health checks while experts compute), one batch at a
time, and turns a `RequestError` into the status it names. Anything unexpected is logged and
answered with INTERNAL; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expert_worker import service
from expert_worker.config import WorkerConfig
from protos import expert_pb2, expert_pb2_grpc

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ExpertService(expert_pb2_grpc.ExpertServiceServicer):
    """ExpertService over one shard; computes in one worker thread, one call at a time.

    The shard's buffers and token counters are not re-entrant, so calls queue for its single
    thread; a call the client cancels while it computes still finishes before the next starts.
    """

    def __init__(self, shard: ExpertShard) -> None:
        self._shard = shard
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")

    async def Forward(self, request, context):
        return await self._call(context, service.forward, request)

    async def GetInfo(self, request, context):
        return await self._call(context, service.worker_info)

    async def _call(self, context, fn, *args):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, fn, self._shard, *args)
        except service.RequestError as err:
            code, message = err.code, err.message
        except Exception as err:  # a bug or a device failure: keep serving, say what happened
            log.exception("%s failed", fn.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"
        await context.abort(code, message)


def _listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_server(
    shard: ExpertShard, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts ExpertService + health + reflection on host:port (0 = any free port).

    Returns (server, bound port, health servicer); health reports SERVING for "" and
    SERVICE_NAME once this returns.
    """
    # no SO_REUSEPORT: a second worker on a taken port must fail, not share its traffic
    server = grpc.aio.server(options=[*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0)])
    expert_pb2_grpc.add_ExpertServiceServicer_to_server(ExpertService(shard), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = _listen_address(host, port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise OSError(f"cannot listen on {address}: {err}") from err
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    for name in (health.OVERALL_HEALTH, SERVICE_NAME):
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


async def serve(shard: ExpertShard, config: WorkerConfig) -> None:
    """Serves shard until SIGINT or SIGTERM, then drains: NOT_SERVING, then stop(grace)."""
    server, port, health_servicer = await start_server(shard, config.host, config.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if config.port_file is not None:
            write_port_file(config.port_file, port)
        log.info(
            "serving on %s (experts %s, %s on %s)",
            _listen_address(config.host, port),
            service.format_ids(shard.expert_ids),
            shard.precision,
            shard.device,
        )
        await stop.wait()
        log.info("stopping: draining calls in flight for up to %.1f s", config.grace_s)
        await health_servicer.enter_graceful_shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await server.stop(config.grace_s)
    log.info("stopped")
