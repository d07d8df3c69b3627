"""The expert worker's gRPC server: ExpertService, health and reflection on one asyncio server.

The servicer only adapts: it runs `service.forward` / `service.worker_info` on the shard's own
thread (so the event loop keeps answering health checks while experts compute), one batch at a
time, and turns a `RequestError` into the status it names. Anything unexpected is logged and
answered with INTERNAL; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health

from expert_worker import service
from expert_worker.config import WorkerConfig
from moe_core import grpc_server
from protos import expert_pb2, expert_pb2_grpc

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


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


async def start_server(
    shard: ExpertShard, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts ExpertService + health + reflection on host:port (0 = any free port).

    Returns (server, bound port, health servicer); health reports SERVING for "" and
    SERVICE_NAME once this returns.
    """
    service_impl = ExpertService(shard)
    return await grpc_server.start_server(
        lambda server: expert_pb2_grpc.add_ExpertServiceServicer_to_server(service_impl, server),
        SERVICE_NAME,
        host,
        port,
    )


async def serve(shard: ExpertShard, config: WorkerConfig) -> None:
    """Serves shard until SIGINT or SIGTERM, then drains: NOT_SERVING, then stop(grace)."""
    server, port, health_servicer = await start_server(shard, config.host, config.port)
    log.info(
        "serving on %s (experts %s, %s on %s)",
        grpc_server.listen_address(config.host, port),
        grpc_server.format_ids(shard.expert_ids),
        shard.precision,
        shard.device,
    )
    await grpc_server.serve_until_signal(
        server, health_servicer, port, config.port_file, config.grace_s
    )
    log.info("stopped")
