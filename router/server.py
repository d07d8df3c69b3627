"""The router's gRPC server: RouterService, health and reflection on one asyncio server.

Start-up: read the model spec and tokenizer, ask every expert worker GetInfo, load the dense part,
allocate the KV cache, start the step loop, then listen. The servicer only adapts calls to
`router.service` and turns a `ServiceError` into its status; anything unexpected is logged and
answered INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health

from attention_worker.kv_cache import KVCache
from moe_core import grpc_server
from moe_core.spec import ModelSpec
from protos import router_pb2, router_pb2_grpc
from router import service
from router.config import RouterConfig
from router.dispatch import RemoteExpertBackend
from router.engine import Engine
from router.model import load_model
from router.scheduler import Scheduler
from router.tokenizer import Tokenizer
from router.workers import WorkerRegistry

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


class RouterService(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: service.Router) -> None:
        self._router = router

    async def Generate(self, request, context):
        try:
            async for chunk in service.generate(self._router, request):
                yield chunk
        except service.ServiceError as err:
            await context.abort(err.code, err.message)
        except Exception as err:
            await _internal(context, "Generate", err)

    async def Logits(self, request, context):
        return await self._unary(context, "Logits", service.logits(self._router, request))

    async def GetInfo(self, request, context):
        return await self._unary(context, "GetInfo", service.cluster_info(self._router))

    @staticmethod
    async def _unary(context, name: str, call):
        try:
            return await call
        except service.ServiceError as err:
            await context.abort(err.code, err.message)
        except Exception as err:
            await _internal(context, name, err)


async def _internal(context, name: str, err: Exception) -> None:
    log.error("%s failed", name, exc_info=err)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")


async def build_router(config: RouterConfig) -> service.Router:
    """Connects to the workers and loads the dense model; raises ModelError / WorkerSetupError."""
    spec = ModelSpec.from_dir(config.model_dir)
    tokenizer = Tokenizer.from_model_dir(config.model_dir)
    workers = await WorkerRegistry.connect(
        list(config.workers), spec, config.precision, config.rpc_timeout_s
    )
    try:
        backend = RemoteExpertBackend(
            workers, asyncio.get_running_loop(), config.precision, config.rpc_timeout_s
        )
        model = await asyncio.to_thread(
            load_model, config.model_dir, backend, config.device, config.dense_dtype
        )
        cache = KVCache(
            spec, config.max_batch_size, config.max_seq_len, config.device, config.dense_dtype
        )
    except BaseException:
        await workers.close()
        raise
    scheduler = Scheduler(
        cache,
        max_batch_size=config.max_batch_size,
        max_step_tokens=config.max_step_tokens,
        max_seq_len=config.max_seq_len,
        eos_token_ids=spec.eos_token_ids,
    )
    engine = Engine(model, cache, scheduler)
    await engine.start()
    return service.Router(config, spec, engine, workers, tokenizer)


async def start_server(
    router: service.Router, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """RouterService + health + reflection on host:port -> (server, bound port, health)."""
    servicer = RouterService(router)
    return await grpc_server.start_server(
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
        SERVICE_NAME,
        host,
        port,
    )


async def serve(config: RouterConfig, grace_s: float = 5.0) -> None:
    """Serves until SIGINT or SIGTERM, then drains: NOT_SERVING, stop(grace), engine, channels."""
    router = await build_router(config)
    try:
        server, port, health_servicer = await start_server(router, config.host, config.port)
    except BaseException:
        await router.engine.stop()
        await router.workers.close()
        raise
    log.info(
        "serving on %s (%s, %d workers, %s on %s)",
        grpc_server.listen_address(config.host, port),
        config.model_dir.name,
        len(config.workers),
        config.precision,
        config.device,
    )
    try:
        await grpc_server.serve_until_signal(
            server, health_servicer, port, config.port_file, grace_s
        )
    finally:
        await router.engine.stop()
        await router.workers.close()
    log.info("stopped")
