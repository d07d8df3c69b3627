"""The router's gRPC server: RouterService, health and reflection on one asyncio server.

Start-up: read the model spec and tokenizer, ask every expert worker GetInfo, load the dense part,
allocate the KV cache, start the step loop, then listen. `Security` decides TLS (clients show no
certificate; the router shows its own to the workers) and the bearer token (checked on
RouterService calls, sent on every call to the workers). The servicer only adapts calls to
`router.service` and turns a `ServiceError` into its status; anything unexpected is logged and
answered INTERNAL, and the server keeps serving. Requests over `max_request_bytes` get
RESOURCE_EXHAUSTED and malformed ones INVALID_ARGUMENT (`moe_core.grpc_server`); on SIGTERM the
router drains (`grpc_server.serve_until_signal`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import grpc
import torch
from grpc_health.v1 import health

from moe_core import grpc_server
from moe_core.interceptors import Drain
from moe_core.metrics import start_metrics_server
from moe_core.security import Security, make_channel
from moe_core.spec import ModelSpec
from protos import router_pb2, router_pb2_grpc
from router import service
from router.admission import Admission
from router.config import Discovery, RouterConfig
from router.decode_graphs import cache_and_graphs
from router.dispatch import RemoteExpertBackend
from router.engine import Engine
from router.forwarders import ForwarderPool
from router.metrics import RouterMetrics
from router.model import load_model
from router.native_transport import NativeTransport
from router.overlap import OverlapPolicy
from router.profiler import StepProfiler
from router.scheduler import Scheduler
from router.tokenizer import Tokenizer
from router.workers import CHANNEL_OPTIONS, PoolConfig, WorkerPool

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


class RouterService(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: service.Router) -> None:
        self._router = router

    async def Generate(self, request, context):
        try:
            async with contextlib.aclosing(service.generate(self._router, request)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except service.ServiceError as err:
            await context.abort(err.code, err.message)
        except Exception as err:
            await _internal(context, "Generate", err)

    async def Logits(self, request, context):
        return await self._unary(context, "Logits", service.logits(self._router, request))

    async def GetInfo(self, request, context):
        info = service.cluster_info(self._router, context.time_remaining())
        return await self._unary(context, "GetInfo", info)

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


async def build_router(config: RouterConfig, security: Security | None = None) -> service.Router:
    """Connects to the workers and loads the dense model; raises ModelError / WorkerSetupError.

    security: TLS identity and token of the calls to the workers; None = plaintext, no token.
    """
    spec = ModelSpec.from_dir(config.model_dir)
    tokenizer = Tokenizer.from_model_dir(config.model_dir)
    metrics = RouterMetrics(spec.moe_layers, spec.num_experts)
    channels = functools.partial(
        make_channel,
        security=security,
        server_name=config.worker_tls_server_name,
        options=CHANNEL_OPTIONS,
    )
    workers = WorkerPool(
        spec,
        config.precision,
        PoolConfig(
            startup_timeout_s=config.startup_timeout_s,
            leave_grace_s=config.rpc_timeout_s,
            channel_factory=channels,
        ),
        metrics,
    )
    if config.discovery is Discovery.KUBERNETES:
        from router.discovery import PodWatcher  # the kubernetes package loads only here

        await workers.follow(PodWatcher(config.kubernetes_discovery(), workers))
    else:
        await workers.start(config.workers)
    try:
        forwarders = None
        if config.forwarders:
            forwarders = ForwarderPool(
                config.forwarders,
                security,
                config.worker_tls_server_name,
                CHANNEL_OPTIONS,
                pin=torch.device(config.device).type == "cuda",
                metrics=metrics,
            )
            workers.attach(forwarders)
        transport = None
        if config.transport == "native":
            transport = NativeTransport(
                security,
                config.worker_tls_server_name,
                pin=torch.device(config.device).type == "cuda",
                metrics=metrics,
                connections=config.worker_connections,
            )
            workers.attach(transport)
        backend = RemoteExpertBackend(
            workers,
            asyncio.get_running_loop(),
            config.precision,
            config.rpc_timeout_s,
            on_expert_loss=config.on_expert_loss,
            attempts=config.dispatch_attempts,
            metrics=metrics,
            forwarders=forwarders,
            forwarded_min_bytes=config.forwarder_min_bytes,
            transport=transport,
        )
        model = await asyncio.to_thread(
            load_model, config.model_dir, backend, config.device, config.dense_dtype
        )
        if config.profile_steps:
            model.set_profiler(StepProfiler(config.device, metrics.record_profile))
        cache, graphs = cache_and_graphs(
            model,
            config.max_batch_size,
            config.max_seq_len,
            config.device,
            config.dense_dtype,
            config.cuda_graphs,
            metrics,
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
    overlap = OverlapPolicy(len(spec.moe_layers), fixed=config.micro_batches)
    engine = Engine(model, cache, scheduler, metrics, overlap, graphs)
    await engine.start()
    admission = Admission(config.max_concurrent_requests, config.max_waiting)
    return service.Router(config, spec, engine, workers, tokenizer, metrics, admission)


async def start_server(
    router: service.Router,
    host: str,
    port: int,
    security: Security | None = None,
    drain: Drain | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """RouterService + health + reflection on host:port -> (server, bound port, health).

    security: TLS without client certificates (clients authenticate with the token) and the
    token check; None = plaintext, no token.
    """
    security = security or Security()
    servicer = RouterService(router)
    return await grpc_server.start_server(
        lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
        SERVICE_NAME,
        host,
        port,
        **security.server_settings(require_client_auth=False),
        drain=drain,
        max_receive_bytes=router.config.max_request_bytes,
    )


async def serve(
    config: RouterConfig, security: Security | None = None, grace_s: float = 5.0
) -> None:
    """Serves until SIGINT or SIGTERM, then drains: NOT_SERVING, new calls refused, calls in
    flight finish within grace_s, then the server, the engine and the channels stop.

    With config.metrics_port set, /metrics is served on config.host from before the port file
    is written until the end.
    """
    security = security or Security()
    router = await build_router(config, security)
    drain = Drain(SERVICE_NAME)
    metrics_server = None
    try:
        if config.metrics_port is not None:
            metrics_server = start_metrics_server(
                router.metrics.registry, config.host, config.metrics_port, config.metrics_port_file
            )
        server, port, health_servicer = await start_server(
            router, config.host, config.port, security, drain
        )
    except BaseException:
        if metrics_server is not None:
            metrics_server.close()
        await router.engine.stop()
        await router.workers.close()
        raise
    log.info(
        "serving on %s (%s, %d workers, %s on %s, %d CPU threads, %s)",
        grpc_server.listen_address(config.host, port),
        config.model_dir.name,
        len(router.workers.workers),
        config.precision,
        config.device,
        torch.get_num_threads(),
        security.describe(require_client_auth=False),
    )
    try:
        await grpc_server.serve_until_signal(
            server, health_servicer, port, config.port_file, grace_s, drain
        )
    finally:
        await router.engine.stop()
        await router.workers.close()
        if metrics_server is not None:
            metrics_server.close()
    log.info("stopped")
