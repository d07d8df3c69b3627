"""An expert worker's Prometheus metrics: one `WorkerMetrics` per worker.

Calls by method and outcome and the calls waiting for or running on the expert thread (the
servicer, `expert_worker.server`); per batch that succeeded, its tokens, token-expert pairs and
seconds (`expert_worker.service.forward`); the bytes of expert weights held, and on CUDA the
device memory torch has allocated and reserved (read at scrape time).
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from moe_core.metrics import SECONDS_BUCKETS, SIZE_BUCKETS, new_registry, outcome_of

PREFIX = "moe_worker"


class CallRecord:
    """One call: in the queue-depth gauge while it lasts, then counted once by outcome.

    Use as a context manager; leaving it without `finish` counts the call by the exception that
    ended it (`moe_core.metrics.outcome_of`), or "ok".
    """

    def __init__(self, metrics: WorkerMetrics, method: str) -> None:
        self._metrics = metrics
        self.method = method
        self._finished = False

    def finish(self, outcome: str) -> None:
        if not self._finished:
            self._finished = True
            self._metrics.requests.labels(self.method, outcome).inc()

    def __enter__(self) -> CallRecord:
        self._metrics.queue_depth.inc()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._metrics.queue_depth.dec()
        self.finish(outcome_of(exc))


class WorkerMetrics:
    """Every collector of one worker, on `registry` (a fresh one by default).

    resident_weight_bytes: the expert weights held (`ExpertShard.resident_bytes()`); device: where
    they live (GPU memory gauges exist only for a CUDA device).
    """

    def __init__(
        self,
        resident_weight_bytes: int,
        device: torch.device | str = "cpu",
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry = new_registry() if registry is None else registry
        p = PREFIX
        self.requests = Counter(
            f"{p}_requests_total",
            "Calls answered, by gRPC method (Forward, GetInfo) and outcome (ok, invalid, "
            "cancelled, exhausted, error, ...).",
            ["method", "outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            f"{p}_queue_depth",
            "Calls received and not yet answered: waiting for or running on the expert thread.",
            registry=registry,
        )
        self.batches = Counter(f"{p}_batches_total", "Forward batches computed.", registry=registry)
        self.tokens = Counter(
            f"{p}_tokens_total", "Tokens (rows) received in Forward batches.", registry=registry
        )
        self.expert_tokens = Counter(
            f"{p}_expert_tokens_total",
            "Token-expert pairs computed (a token sent for two of this worker's experts counts "
            "two); summed over workers it equals the router's moe_router_expert_tokens_total.",
            registry=registry,
        )
        self.batch_tokens = Histogram(
            f"{p}_batch_tokens",
            "Tokens per Forward batch.",
            registry=registry,
            buckets=SIZE_BUCKETS,
        )
        self.compute_seconds = Histogram(
            f"{p}_compute_seconds",
            "Seconds to answer one Forward batch: checks, decoding, the experts, encoding.",
            registry=registry,
            buckets=SECONDS_BUCKETS,
        )
        self.resident_weight_bytes = Gauge(
            f"{p}_resident_weight_bytes",
            "Bytes of expert weights held (on the worker's device).",
            registry=registry,
        )
        self.resident_weight_bytes.set(resident_weight_bytes)
        device = torch.device(device)
        if device.type == "cuda":
            Gauge(
                f"{p}_gpu_memory_allocated_bytes",
                "GPU memory allocated by torch on the worker's device.",
                registry=registry,
            ).set_function(lambda: torch.cuda.memory_allocated(device))
            Gauge(
                f"{p}_gpu_memory_reserved_bytes",
                "GPU memory reserved by torch's caching allocator on the worker's device.",
                registry=registry,
            ).set_function(lambda: torch.cuda.memory_reserved(device))

    def request(self, method: str) -> CallRecord:
        return CallRecord(self, method)

    def record_batch(self, tokens: int, expert_tokens: int, seconds: float) -> None:
        """A Forward batch of `tokens` rows and `expert_tokens` token-expert pairs, answered in
        `seconds`."""
        self.batches.inc()
        self.tokens.inc(tokens)
        self.expert_tokens.inc(expert_tokens)
        self.batch_tokens.observe(tokens)
        self.compute_seconds.observe(seconds)
