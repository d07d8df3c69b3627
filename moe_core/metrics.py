"""What the router's and the workers' Prometheus metrics share: registries, buckets, outcomes and
the `/metrics` HTTP server.

Every component keeps its metrics on its own `CollectorRegistry` (never prometheus_client's global
one), so that several routers or workers built in one process do not clash. Names follow
Prometheus conventions: the `moe_` prefix, then the component (`moe_router_`, `moe_worker_`), and
the unit last (`_seconds`, `_bytes`, `_total` for counters).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)

from moe_core.grpc_server import listen_address, write_port_file

log = logging.getLogger(__name__)

# Histogram buckets shared by every component, so that dashboards can compare them.
# Seconds: 100 us (a small expert batch) to 5 min (a long generation).
SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    60.0,
    120.0,
    300.0,
)
# Sizes (sequences or tokens per step or batch): powers of two up to 65536.
SIZE_BUCKETS = tuple(float(2**i) for i in range(17))

# How a call ended, as the `outcome` label of the requests_total counters.
_OUTCOMES = {
    grpc.StatusCode.OK: "ok",
    grpc.StatusCode.CANCELLED: "cancelled",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.OUT_OF_RANGE: "invalid",
    grpc.StatusCode.FAILED_PRECONDITION: "invalid",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "timeout",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "exhausted",
    grpc.StatusCode.UNAUTHENTICATED: "denied",
    grpc.StatusCode.PERMISSION_DENIED: "denied",
}
OUTCOMES = (*dict.fromkeys(_OUTCOMES.values()), "error")  # every value the label takes


def outcome(code: grpc.StatusCode) -> str:
    """The outcome label of a call answered with `code`: ok, cancelled, invalid, unavailable,
    timeout, exhausted, denied, or error (INTERNAL, UNKNOWN and the rest)."""
    return _OUTCOMES.get(code, "error")


def outcome_of(exc: BaseException | None) -> str:
    """The outcome label of a call that ended with `exc` (None: it succeeded).

    A caller that went away (task cancelled, generator closed) is "cancelled"; an exception with
    a `code` attribute holding a `grpc.StatusCode` (ServiceError, RequestError, grpc errors)
    maps by `outcome`; anything else is "error".
    """
    if exc is None:
        return "ok"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "cancelled"
    code = getattr(exc, "code", None)
    if callable(code) and not isinstance(code, grpc.StatusCode):
        try:  # grpc.RpcError exposes code() as a method
            code = code()
        except Exception:
            code = None
    return outcome(code) if isinstance(code, grpc.StatusCode) else "error"


def new_registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and garbage-collector metrics that
    prometheus_client puts on its default one (process_*, python_*)."""
    registry = CollectorRegistry(auto_describe=True)
    for default, collector in (
        (PROCESS_COLLECTOR, ProcessCollector),
        (PLATFORM_COLLECTOR, PlatformCollector),
        (GC_COLLECTOR, GCCollector),
    ):
        if default is not None:
            collector(registry=registry)
    return registry


@dataclass
class MetricsServer:
    """A running `/metrics` endpoint; `close()` stops it."""

    host: str
    port: int  # the bound port
    _httpd: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{listen_address(self.host, self.port)}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, port_file: Path | None = None
) -> MetricsServer:
    """Serves `registry` at http://host:port/metrics from a daemon thread.

    port 0 picks a free port. Once listening, writes the bound port to port_file (atomically,
    as the gRPC port file) when given, and logs the URL. Raises OSError when it cannot listen.
    """
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"cannot serve metrics on {listen_address(host, port)}: {err}") from err
    server = MetricsServer(host, int(httpd.server_port), httpd, thread)
    try:
        if port_file is not None:
            write_port_file(port_file, server.port)
    except BaseException:
        server.close()
        raise
    log.info("metrics on %s", server.url)
    return server


def check_listen_options(config) -> None:
    """Checks the listening fields every server config has (host, port, port_file, metrics_port,
    metrics_port_file) and makes the files Paths; ValueError names the problem."""
    if not config.host:
        raise ValueError("host may not be empty")
    if not 0 <= config.port < 65536:
        raise ValueError(f"port must be in 0-65535, got {config.port}")
    if config.port_file is not None:
        config.port_file = Path(config.port_file)
    if config.metrics_port_file is not None:
        config.metrics_port_file = Path(config.metrics_port_file)
    check_metrics_options(config.port, config.metrics_port, config.metrics_port_file)


def check_metrics_options(port: int, metrics_port: int | None, port_file: Path | None) -> None:
    """Validates a config's metrics options; ValueError names the problem."""
    if metrics_port is None:
        if port_file is not None:
            raise ValueError("a metrics port file needs a metrics port (0 = pick a free one)")
        return
    if not 0 <= metrics_port < 65536:
        raise ValueError(f"metrics_port must be in 0-65535, got {metrics_port}")
    if metrics_port != 0 and metrics_port == port:
        raise ValueError(f"the metrics port and the gRPC port are both {port}")
