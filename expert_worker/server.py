"""The expert worker's gRPC server: ExpertService, health and reflection on one asyncio server.

The servicer only adapts: it runs `wire_forward.forward_bytes` / `service.worker_info` on the
shard's own thread (so the event loop keeps answering health checks while experts compute), one
batch at a time, and turns a `RequestError` into the status it names. Anything unexpected is
logged and answered with INTERNAL; the server keeps serving. At most `max_concurrent_forwards`
Forward calls compute or wait for the thread; one more is refused at once with
RESOURCE_EXHAUSTED. Malformed requests get INVALID_ARGUMENT, and on SIGTERM the worker drains
(`moe_core.grpc_server`). With TLS the worker requires a client certificate signed by the CA
(mutual TLS); with a token, ExpertService calls must carry it. With fronts (`--fronts N`) this
process serves no gRPC itself: its fronts listen on the port and hand it the calls
(expert_worker.fronts).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import grpc
import torch
from grpc_health.v1 import health

from expert_worker import service, wire_forward
from expert_worker.config import WorkerConfig
from expert_worker.fronts import FrontPool
from expert_worker.metrics import WorkerMetrics
from moe_core import grpc_server
from moe_core.interceptors import Drain
from moe_core.metrics import outcome, start_metrics_server
from moe_core.security import Security
from protos import expert_pb2, expert_pb2_grpc

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard

log = logging.getLogger(__name__)

SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


class ExpertService(expert_pb2_grpc.ExpertServiceServicer):
    """ExpertService over one shard; computes in one worker thread, one call at a time.

    The shard's buffers and token counters are not re-entrant, so calls queue for its single
    thread; a call the client cancels while it computes still finishes before the next starts,
    one cancelled while queued never runs. Every call is recorded in `metrics` (a fresh
    `WorkerMetrics` when None).
    """

    def __init__(
        self,
        shard: ExpertShard,
        metrics: WorkerMetrics | None = None,
        max_concurrent_forwards: int = 16,
    ) -> None:
        self._shard = shard
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="experts")
        if metrics is None:
            metrics = WorkerMetrics(shard.resident_bytes(), shard.device)
        self._metrics = metrics
        self._max_forwards = max_concurrent_forwards
        self._forwards = 0  # Forward calls computing or queued

    @property
    def metrics(self) -> WorkerMetrics:
        return self._metrics

    def after_calls(self, fn, *args) -> None:
        """Runs fn(*args) on the experts' thread once the calls queued so far are done."""
        self._thread.submit(fn, *args)

    async def Forward(self, request: bytes, context):
        """request: a serialized ExpertForwardRequest -> the serialized response (see
        `add_servicer`: Forward skips protobuf's serializers)."""
        return await self._abort_on_error(
            context, self.forward(wire_forward.forward_bytes, request, self._metrics)
        )

    async def GetInfo(self, request, context):
        return await self._abort_on_error(context, self.run("GetInfo", service.worker_info))

    async def forward(self, fn, *args):
        """A Forward call: fn(shard, *args) on the experts' thread, within the concurrency limit;
        RequestError when refused or failed. (Also for the calls that front processes take.)"""
        if self._forwards >= self._max_forwards:
            with self._metrics.request("Forward") as record:
                record.finish(outcome(grpc.StatusCode.RESOURCE_EXHAUSTED))
            raise service.RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this worker is at capacity: {self._forwards} Forward calls are computing or "
                f"queued (--max-concurrent-forwards {self._max_forwards}); retry later",
            )
        self._forwards += 1
        try:
            return await self.run("Forward", fn, *args)
        finally:
            self._forwards -= 1

    async def run(self, method: str, fn, *args):
        """fn(shard, *args) on the experts' thread, recorded as a `method` call; RequestError
        for a refusal, and (logged) INTERNAL for anything unexpected."""
        loop = asyncio.get_running_loop()
        with self._metrics.request(method) as record:
            try:
                return await loop.run_in_executor(self._thread, fn, self._shard, *args)
            except service.RequestError as err:
                record.finish(outcome(err.code))
                raise
            except Exception as err:  # a bug or a device failure: keep serving, say what happened
                log.exception("%s failed", method)
                record.finish(outcome(grpc.StatusCode.INTERNAL))
                raise service.RequestError(
                    grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}"
                ) from err

    @staticmethod
    async def _abort_on_error(context, call):
        try:
            return await call
        except service.RequestError as err:
            code, message = err.code, err.message
        await context.abort(code, message)


def add_servicer(servicer: ExpertService, server: grpc.aio.Server) -> None:
    """Registers ExpertService as `expert_pb2_grpc.add_ExpertServiceServicer_to_server` does,
    except that Forward takes and returns raw bytes (the same messages, encoded and read by
    `expert_worker.wire_forward` without protobuf's copies of the tensor data)."""
    handlers = {
        "Forward": grpc.unary_unary_rpc_method_handler(servicer.Forward),
        "GetInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetInfo,
            request_deserializer=expert_pb2.WorkerInfoRequest.FromString,
            response_serializer=expert_pb2.WorkerInfo.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


async def start_server(
    shard: ExpertShard,
    host: str = "127.0.0.1",
    port: int = 0,
    security: Security | None = None,
    metrics: WorkerMetrics | None = None,
    max_concurrent_forwards: int = 16,
    drain: Drain | None = None,
    servicer: ExpertService | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts ExpertService + health + reflection on host:port (0 = any free port).

    security: mutual TLS (clients must show a certificate signed by its CA) and the token
    check; None = plaintext, no token. Returns (server, bound port, health servicer); health
    reports SERVING for "" and SERVICE_NAME once this returns. Calls are recorded in metrics
    (see ExpertService). servicer: the ExpertService to serve (made here when None);
    reuse_port: the worker's fronts listen on the same port.
    """
    security = security or Security()
    service_impl = servicer or ExpertService(shard, metrics, max_concurrent_forwards)
    return await grpc_server.start_server(
        lambda server: add_servicer(service_impl, server),
        SERVICE_NAME,
        host,
        port,
        **security.server_settings(require_client_auth=True),
        drain=drain,
        reuse_port=reuse_port,
    )


async def serve(shard: ExpertShard, config: WorkerConfig, security: Security | None = None) -> None:
    """Serves shard until SIGINT or SIGTERM, then drains: NOT_SERVING, new calls refused with
    UNAVAILABLE, calls in flight finish within config.grace_s, then the server stops.

    With config.metrics_port set, /metrics is served on config.host from before the port file
    is written until the end.
    """
    metrics = WorkerMetrics(shard.resident_bytes(), shard.device)
    metrics_server = None
    if config.metrics_port is not None:
        metrics_server = start_metrics_server(
            metrics.registry, config.host, config.metrics_port, config.metrics_port_file
        )
    try:
        await _serve(shard, config, security or Security(), metrics)
    finally:
        if metrics_server is not None:
            metrics_server.close()


async def _serve(
    shard: ExpertShard, config: WorkerConfig, security: Security, metrics: WorkerMetrics
) -> None:
    servicer = ExpertService(shard, metrics, config.max_concurrent_forwards)
    if config.fronts:
        await _serve_through_fronts(shard, servicer, config, security)
        return
    drain = Drain(SERVICE_NAME)
    server, port, health_servicer = await start_server(
        shard, config.host, config.port, security, drain=drain, servicer=servicer
    )
    _log_serving(shard, config, port, security)
    await grpc_server.serve_until_signal(
        server, health_servicer, port, config.port_file, config.grace_s, drain
    )
    log.info("stopped")


async def _serve_through_fronts(
    shard: ExpertShard, servicer: ExpertService, config: WorkerConfig, security: Security
) -> None:
    """--fronts N: only the fronts listen, and every call's bytes are copied there; this
    process holds the port (so that a front started again binds it) and computes. On SIGTERM
    the fronts drain (health NOT_SERVING, new calls refused, calls in flight finish)."""
    with grpc_server.reserved_port(config.host, config.port) as port:
        pin = shard.device.type == "cuda"
        fronts = FrontPool(config.fronts, servicer, config.host, port, security, pin)
        try:
            await fronts.wait_ready()
        except BaseException:
            await fronts.drain(0.0)
            raise
        _log_serving(shard, config, port, security)
        async with grpc_server.stop_signal() as stop:
            if config.port_file is not None:
                grpc_server.write_port_file(config.port_file, port)
            await stop.wait()
            log.info("stopping: draining calls in flight for up to %.1f s", config.grace_s)
            await fronts.drain(config.grace_s)
    log.info("stopped")


def _log_serving(shard: ExpertShard, config: WorkerConfig, port: int, security: Security) -> None:
    log.info(
        "serving on %s (experts %s, %s on %s, %d CPU threads, %s%s)",
        grpc_server.listen_address(config.host, port),
        grpc_server.format_ids(shard.expert_ids),
        shard.precision,
        shard.device,
        torch.get_num_threads(),
        security.describe(require_client_auth=True),
        f", {config.fronts} front processes" if config.fronts else "",
    )
