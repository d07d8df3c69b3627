"""The router's Prometheus metrics: one `RouterMetrics` per router, passed to whoever records.

Client calls (`router.service`): `moe_router_requests_total{method, outcome}`, latency of the
calls that succeeded, time to first token, inter-token latency, prompt and generated tokens.
Step loop (`router.engine`): waiting and running requests, sequences, tokens and seconds per step.
Dispatch path (`router.dispatch`): dispatch+combine seconds per MoE layer, serialized message
bytes sent to and received from each worker, each worker call's seconds, failures and retries
per worker, the router's view of each worker's health, and tokens routed to each expert.
Step profile (`router.profiler`, with --profile-steps only): seconds per phase and step kind.

Cardinality: `worker` labels are addresses (as many as workers; `forget_worker` drops the series
of one that left), `layer` labels MoE layers, `method` and `outcome` small fixed sets. Tokens per
expert are labelled {layer, expert} while MoE layers x experts stays within `max_expert_series`
(4096 by default: Mixtral 256, Qwen1.5-MoE 1440); above it (DeepSeek-V3: 58 x 256) the layers
are summed and the series carry layer="all", one per expert.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Awaitable, Iterable, Sequence
from typing import TypeVar

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moe_core.metrics import SECONDS_BUCKETS, SIZE_BUCKETS, new_registry, outcome_of

PREFIX = "moe_router"
MAX_EXPERT_SERIES = 4096
ALL_LAYERS = "all"  # the layer label of expert counts summed over layers

T = TypeVar("T")


class RequestRecord:
    """One client call: counted once by outcome; a generation also times its tokens.

    Use as a context manager: leaving it without `finish` counts the call by the exception that
    ended it (`moe_core.metrics.outcome_of`), or "ok".
    """

    def __init__(self, metrics: RouterMetrics, method: str) -> None:
        self._metrics = metrics
        self.method = method
        self._start = time.perf_counter()
        self._last_token: float | None = None
        self._finished = False

    def prompt_tokens(self, count: int) -> None:
        self._metrics.prompt_tokens.inc(count)

    def tokens(self, count: int) -> None:
        """`count` tokens produced now: the first one times TTFT, the rest inter-token latency
        (a chunk of n tokens after a gap of d seconds counts n gaps of d/n; the tokens that come
        with the first one, gaps of 0)."""
        if count <= 0:
            return
        now = time.perf_counter()
        m = self._metrics
        if self._last_token is None:
            m.time_to_first_token.observe(now - self._start)
            gaps, gap = count - 1, 0.0
        else:
            gaps, gap = count, (now - self._last_token) / count
        for _ in range(gaps):
            m.inter_token_latency.observe(gap)
        m.generated_tokens.inc(count)
        self._last_token = now

    def finish(self, outcome: str) -> None:
        """Counts the call as `outcome` (once; later calls are ignored). Successful calls also
        record their latency."""
        if self._finished:
            return
        self._finished = True
        m = self._metrics
        m.requests.labels(self.method, outcome).inc()
        if outcome == "ok":
            m.request_latency.labels(self.method).observe(time.perf_counter() - self._start)

    def __enter__(self) -> RequestRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(outcome_of(exc))


class _ExpertTokens(Collector):
    """moe_router_expert_tokens_total{layer, expert}: tallies kept in one int64 tensor and read
    at scrape time (a Counter child per expert would cost a lock per expert per layer per step)."""

    NAME = f"{PREFIX}_expert_tokens"
    DOC = "Tokens routed to each expert (token-expert pairs), by MoE layer (or layer=all)."

    def __init__(self, moe_layers: Sequence[int], num_experts: int, max_series: int) -> None:
        layers = list(moe_layers)
        self.per_layer = len(layers) * num_experts <= max_series
        self.labels = [str(layer) for layer in layers] if self.per_layer else [ALL_LAYERS]
        self._row = {layer: i for i, layer in enumerate(layers)} if self.per_layer else None
        self._counts = torch.zeros(len(self.labels), num_experts, dtype=torch.int64)  # [L, E]
        self._lock = threading.Lock()

    def add(self, layer: int, counts: torch.Tensor) -> None:
        """counts [E] int64 tokens per expert of one layer."""
        num_experts = self._counts.shape[1]
        if counts.shape != (num_experts,):
            raise ValueError(f"expected {num_experts} expert counts, got {tuple(counts.shape)}")
        row = 0 if self._row is None else self._row.get(layer)
        if row is None:
            raise ValueError(f"layer {layer} is not an MoE layer ({', '.join(self.labels)})")
        with self._lock:
            self._counts[row] += counts

    def describe(self) -> Iterable[CounterMetricFamily]:
        yield CounterMetricFamily(self.NAME, self.DOC, labels=["layer", "expert"])

    def collect(self) -> Iterable[CounterMetricFamily]:
        with self._lock:
            counts = self._counts.tolist()
        family = CounterMetricFamily(self.NAME, self.DOC, labels=["layer", "expert"])
        for layer, row in zip(self.labels, counts, strict=True):
            for expert, count in enumerate(row):
                family.add_metric([layer, str(expert)], count)
        yield family


class RouterMetrics:
    """Every collector of one router, on `registry` (a fresh one by default).

    moe_layers and num_experts (from the model spec) size the per-expert token tallies.
    Thread-safe: the service records on the event loop, the engine and dispatch on the step
    thread, the HTTP server reads from its own.
    """

    def __init__(
        self,
        moe_layers: Sequence[int],
        num_experts: int,
        registry: CollectorRegistry | None = None,
        max_expert_series: int = MAX_EXPERT_SERIES,
    ) -> None:
        self.registry = registry = new_registry() if registry is None else registry
        p, s = PREFIX, SECONDS_BUCKETS

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"{p}_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"{p}_{name}", doc, labels, registry=registry)

        def histogram(name: str, doc: str, labels: Sequence[str] = (), buckets=s) -> Histogram:
            return Histogram(f"{p}_{name}", doc, labels, registry=registry, buckets=buckets)

        # client calls (router.service)
        self.requests = counter(
            "requests_total",
            "Client calls finished, by gRPC method and outcome (ok, invalid, cancelled, "
            "unavailable, timeout, exhausted, denied, error).",
            ["method", "outcome"],
        )
        self.request_latency = histogram(
            "request_latency_seconds",
            "Seconds from the call's arrival to its last reply, calls that succeeded.",
            ["method"],
        )
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Seconds from a Generate call's arrival to its first token.",
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Seconds between two tokens of a generation."
        )
        self.prompt_tokens = counter(
            "prompt_tokens_total", "Prompt tokens of accepted Generate and Logits calls."
        )
        self.generated_tokens = counter("generated_tokens_total", "Tokens generated.")
        # step loop (router.engine)
        self.requests_waiting = gauge(
            "requests_waiting", "Requests waiting for a place in the running batch."
        )
        self.requests_running = gauge(
            "requests_running", "Requests in the running batch (with a KV cache slot)."
        )
        self.step_seconds = histogram(
            "step_seconds", "Seconds of one step: forward over every layer and sampling."
        )
        self.step_sequences = histogram(
            "step_sequences", "Sequences per step (the batch size).", buckets=SIZE_BUCKETS
        )
        self.step_tokens = histogram(
            "step_tokens", "Tokens per step (prefill and decode).", buckets=SIZE_BUCKETS
        )
        self.step_micro_batches = counter(
            "step_micro_batches_total",
            "Steps by the number of micro-batches they ran in (overlapping attention with the "
            "expert calls).",
            ["micro_batches"],
        )
        self.graph_steps = counter(
            "graph_steps_total",
            "Decode steps run from CUDA graphs (--cuda-graphs, on a GPU); the other steps run "
            "eagerly.",
        )
        self.graph_captures = counter(
            "graph_captures_total",
            "Buckets (batch size, cache length) of decode graphs captured, each on first use.",
        )
        self.graph_capture_seconds = counter(
            "graph_capture_seconds_total", "Seconds spent capturing decode graphs."
        )
        self.step_failures = counter(
            "step_failures_total",
            "Steps that failed; their requests (or those that chose lost experts) failed.",
        )
        # dispatch path (router.dispatch)
        self.dispatch_combine_seconds = histogram(
            "dispatch_combine_seconds",
            "Seconds from dispatching a layer's tokens to the workers to having combined their "
            "results (the shared experts run in between), by MoE layer.",
            ["layer"],
        )
        self.dispatch_bytes = counter(
            "dispatch_bytes_total",
            "Serialized message bytes sent to (direction=sent) and received from "
            "(direction=received) each expert worker.",
            ["worker", "direction"],
        )
        self.worker_call_seconds = histogram(
            "worker_call_seconds", "Seconds of each successful Forward call, by worker.", ["worker"]
        )
        self.worker_failures = counter(
            "worker_failures_total",
            "Forward calls that failed, by worker and gRPC status.",
            ["worker", "code"],
        )
        self.worker_retries = counter(
            "worker_retries_total",
            "Forward calls retried after a worker failed, by worker.",
            ["worker"],
        )
        self.forwarder_starts = counter(
            "forwarder_starts_total",
            "Forwarder processes started (--forwarders): N at start-up, one more for each that "
            "died and was replaced.",
        )
        self.host_arena_bytes = gauge(
            "host_arena_bytes",
            "Shared host memory the router maps for its forwarder processes (pinned on a GPU).",
        )
        self.worker_healthy = gauge(
            "worker_healthy",
            "1 while the router holds the worker healthy (its last call or probe succeeded), "
            "else 0.",
            ["worker"],
        )
        self.expert_tokens = _ExpertTokens(moe_layers, num_experts, max_expert_series)
        registry.register(self.expert_tokens)
        # step profile (router.profiler; only with --profile-steps)
        self.phase_seconds = counter(
            "step_phase_seconds_total",
            "Profiled steps only (--profile-steps): seconds spent in each phase of the step "
            "(router.profiler.PHASES; worker_compute is part of experts), by step kind "
            "(decode, prefill).",
            ["phase", "step"],
        )
        self.profiled_steps = counter(
            "profiled_steps_total", "Steps profiled (--profile-steps), by step kind.", ["step"]
        )
        self.profiled_step_seconds = counter(
            "profiled_step_seconds_total",
            "Wall seconds of the profiled steps, forward and sampling, by step kind.",
            ["step"],
        )

    # client calls ------------------------------------------------------------------------------

    def request(self, method: str) -> RequestRecord:
        """A record of one call to `method` (the gRPC method name: Generate, Logits, GetInfo)."""
        return RequestRecord(self, method)

    # step loop ---------------------------------------------------------------------------------

    def set_queue(self, waiting: int, running: int) -> None:
        self.requests_waiting.set(waiting)
        self.requests_running.set(running)

    def record_step(self, sequences: int, tokens: int, seconds: float) -> None:
        self.step_sequences.observe(sequences)
        self.step_tokens.observe(tokens)
        self.step_seconds.observe(seconds)

    def record_micro_batches(self, parts: int) -> None:
        self.step_micro_batches.labels(str(parts)).inc()

    def record_graph_step(self) -> None:
        self.graph_steps.inc()

    def record_graph_capture(self, seconds: float) -> None:
        self.graph_captures.inc()
        self.graph_capture_seconds.inc(seconds)

    def record_step_failure(self) -> None:
        self.step_failures.inc()

    def record_profile(self, kind: str, phases: dict[str, float], seconds: float) -> None:
        """One profiled step (`router.profiler.StepProfiler`'s sink)."""
        for phase, phase_seconds in phases.items():
            self.phase_seconds.labels(phase, kind).inc(phase_seconds)
        self.profiled_steps.labels(kind).inc()
        self.profiled_step_seconds.labels(kind).inc(seconds)

    # dispatch path -----------------------------------------------------------------------------

    def record_expert_tokens(self, layer: int, counts: torch.Tensor) -> None:
        """counts [E] int64: one MoE layer's tokens per expert (a bincount of its top-k ids)."""
        self.expert_tokens.add(layer, counts)

    def record_layer(self, layer: int, seconds: float) -> None:
        """One MoE layer's dispatch-to-combine time."""
        self.dispatch_combine_seconds.labels(str(layer)).observe(seconds)

    def record_dispatch(self, worker: str, sent_bytes: int) -> None:
        self.dispatch_bytes.labels(worker, "sent").inc(sent_bytes)

    def record_combine(self, worker: str, received_bytes: int, seconds: float) -> None:
        """A Forward call to `worker` answered after `seconds` with `received_bytes`."""
        self.dispatch_bytes.labels(worker, "received").inc(received_bytes)
        self.worker_call_seconds.labels(worker).observe(seconds)

    def record_worker_failure(
        self, worker: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    ) -> None:
        self.worker_failures.labels(worker, code.name).inc()

    def record_retry(self, worker: str) -> None:
        """A call that `worker` failed is tried again (on it or on another replica)."""
        self.worker_retries.labels(worker).inc()

    def record_forwarder_start(self) -> None:
        self.forwarder_starts.inc()

    def set_host_arena_bytes(self, nbytes: int) -> None:
        self.host_arena_bytes.set(nbytes)

    def set_worker_healthy(self, worker: str, healthy: bool) -> None:
        self.worker_healthy.labels(worker).set(1 if healthy else 0)

    def forget_worker(self, worker: str) -> None:
        """Drops every series labelled with `worker` (a worker that left the cluster)."""
        for collector, label_sets in (
            (self.dispatch_bytes, [(worker, "sent"), (worker, "received")]),
            (self.worker_call_seconds, [(worker,)]),
            (self.worker_retries, [(worker,)]),
            (self.worker_healthy, [(worker,)]),
            (self.worker_failures, [(worker, code.name) for code in grpc.StatusCode]),
        ):
            for labels in label_sets:
                with contextlib.suppress(KeyError):
                    collector.remove(*labels)

    async def observe_call(self, worker: str, sent_bytes: int, call: Awaitable[T]) -> T:
        """Awaits one Forward `call` to `worker` whose request serialized to sent_bytes, recording
        its bytes, time and failure (grpc.aio.AioRpcError); returns its response (a message or
        its serialized bytes). (The worker pool sets health.)"""
        self.record_dispatch(worker, sent_bytes)
        start = time.perf_counter()
        try:
            response = await call
        except grpc.aio.AioRpcError as err:
            self.record_worker_failure(worker, err.code())
            raise
        received = len(response) if isinstance(response, bytes) else response.ByteSize()
        self.record_combine(worker, received, time.perf_counter() - start)
        return response
