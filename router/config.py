"""Configuration of the router service, validated once when it is built."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moe_core.host_threads import check_cpu_threads
from moe_core.metrics import check_listen_options
from moe_core.precision import Precision

if TYPE_CHECKING:  # the kubernetes package loads only with kubernetes discovery
    from router.discovery import KubernetesDiscoveryConfig


TRANSPORTS = ("loop", "native")  # RouterConfig.transport


class ExpertLossPolicy(enum.Enum):
    """What the router does when no live worker holds an expert that tokens chose."""

    FAIL = "fail"  # those requests end with UNAVAILABLE, naming the experts
    DEGRADE = "degrade"  # the experts leave those tokens' top-k; the responses say which


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 hosts in brackets) -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port in 1-65535, got {address!r}")
    return host, int(port)


class Discovery(str, enum.Enum):
    """How the router finds its expert workers."""

    STATIC = "static"  # a fixed list of addresses (`workers`)
    KUBERNETES = "kubernetes"  # the Ready pods in `namespace` that match `selector`

    def __str__(self) -> str:
        return self.value


@dataclass
class RouterConfig:
    """Everything a router process needs; `__post_init__` rejects values that cannot work."""

    model_dir: Path
    workers: tuple[str, ...] = ()  # HOST:PORT of each expert worker (static discovery)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    port_file: Path | None = None  # written (temp + rename) with the bound port once serving
    device: str = "cpu"  # torch device of the dense part and the KV cache
    cpu_threads: int | None = None  # torch's CPU operator threads; None: moe_core.host_threads
    precision: Precision = Precision.FP32  # dense dtype and dispatch format (see `dense_dtype`)
    max_batch_size: int = 64  # sequences per step = KV cache slots
    max_seq_len: int = 4096  # prompt + generated tokens per sequence
    max_new_tokens: int = 4096  # the most tokens one request may ask for
    # when a request leaves max_new_tokens at 0; None = 16, or max_new_tokens if lower
    default_max_new_tokens: int | None = None
    max_prompt_len: int | None = None  # tokens of a Generate prompt; None = max_seq_len - 1
    # requests in the engine at once (running, or queued for the next step); None = max_batch_size
    max_concurrent_requests: int | None = None
    max_waiting: int = 256  # requests waiting for one of those places; more are refused at once
    max_step_tokens: int | None = None  # new tokens per step; None = max(8192, max_seq_len)
    # deadline of every call to an expert worker: how long a hung worker can stall a step before
    # its rows go to a replica
    rpc_timeout_s: float = 10.0
    startup_timeout_s: float = 600.0  # how long start-up waits for the workers to serve
    on_expert_loss: ExpertLossPolicy = ExpertLossPolicy.FAIL  # when no worker serves an expert
    dispatch_attempts: int = 3  # sends of a layer's rows to a worker before the step fails
    # micro-batches per step (ping-pong of attention and expert calls); None = chosen from the
    # measured times (router.overlap). 1 by default: measured, the split does not pay yet
    micro_batches: int | None = 1
    # decode steps from CUDA graphs on a GPU (router.decode_graphs); unsplit steps only
    cuda_graphs: bool = True
    # what sends the calls to the workers: "loop", the router's event loop (with forwarder
    # processes for large layers when forwarders > 0), or "native", gRPC C++ threads reading
    # and writing pinned host memory (router.native_transport; needs the library built)
    transport: str = "loop"
    # with the native transport: connections (channels) to each worker, which its calls take in
    # turn
    worker_connections: int = 1
    # processes that send the calls to the workers (router.forwarders); 0 = the router's own
    # event loop
    forwarders: int = 0
    # with forwarders: layers that stage fewer token bytes than this go on the event loop
    forwarder_min_bytes: int = 8 << 20
    # TLS name checked in the workers' certificates instead of each address's host; None = host
    worker_tls_server_name: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = none
    metrics_port_file: Path | None = None  # written with the bound metrics port once serving
    discovery: Discovery = Discovery.STATIC
    # Kubernetes discovery only (see router.discovery):
    namespace: str | None = None  # of the worker pods
    selector: str | None = None  # label selector of the worker pods
    kubeconfig: Path | None = None  # None: the pod's in-cluster service account
    worker_port: int | None = None  # for pods naming no "grpc" port; None: DEFAULT_WORKER_PORT
    profile_steps: bool = False  # time each step's phases (router.profiler; slows steps a little)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self._check_discovery()
        check_listen_options(self)
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {self.device!r}") from exc
        check_cpu_threads(self.cpu_threads)
        self.precision = Precision(self.precision)
        if self.default_max_new_tokens is None:
            self.default_max_new_tokens = min(16, self.max_new_tokens)
        for name in ("max_batch_size", "max_seq_len", "max_new_tokens", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        if self.max_prompt_len is None:
            self.max_prompt_len = self.max_seq_len - 1
        if not 1 <= self.max_prompt_len < self.max_seq_len:
            raise ValueError(
                f"max_prompt_len must be in 1..max_seq_len - 1 = {self.max_seq_len - 1} (room for "
                f"one generated token), got {self.max_prompt_len}"
            )
        if self.max_concurrent_requests is None:
            self.max_concurrent_requests = self.max_batch_size
        if self.max_concurrent_requests < 1:
            raise ValueError(
                f"max_concurrent_requests must be at least 1, got {self.max_concurrent_requests}"
            )
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting may not be negative, got {self.max_waiting}")
        if self.max_step_tokens is None:
            self.max_step_tokens = max(8192, self.max_seq_len)
        if self.max_step_tokens < self.max_seq_len:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be at least max_seq_len "
                f"({self.max_seq_len}) so that any prompt fits in one step"
            )
        self.on_expert_loss = ExpertLossPolicy(self.on_expert_loss)
        if self.micro_batches is not None and not 1 <= self.micro_batches <= 8:
            raise ValueError(f"micro_batches must be in 1-8, got {self.micro_batches}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.transport == "native" and self.forwarders:
            raise ValueError("forwarders send the event loop's calls: they need transport 'loop'")
        if not 1 <= self.worker_connections <= 64:
            raise ValueError(f"worker_connections must be in 1-64, got {self.worker_connections}")
        if not 0 <= self.forwarders <= 64:
            raise ValueError(f"forwarders must be in 0-64, got {self.forwarders}")
        if self.forwarder_min_bytes < 0:
            raise ValueError(f"forwarder_min_bytes must be >= 0, got {self.forwarder_min_bytes}")
        if self.dispatch_attempts < 1:
            raise ValueError(f"dispatch_attempts must be at least 1, got {self.dispatch_attempts}")
        for name in ("rpc_timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.worker_tls_server_name is not None and not self.worker_tls_server_name.strip():
            raise ValueError("worker_tls_server_name may not be empty")

    @property
    def max_request_bytes(self) -> int:
        """The largest client message accepted (RESOURCE_EXHAUSTED above): 4 MiB, or 8 bytes per
        token of the longest sequence if that is more (a uint32 id takes at most 5)."""
        return max(4 * 1024 * 1024, 8 * self.max_seq_len)

    def _check_discovery(self) -> None:
        self.discovery = Discovery(self.discovery)
        if isinstance(self.workers, str):
            self.workers = tuple(w for w in self.workers.split(",") if w)
        self.workers = tuple(self.workers)
        if self.kubeconfig is not None:
            self.kubeconfig = Path(self.kubeconfig)
        if self.discovery is Discovery.KUBERNETES:
            if self.workers:
                raise ValueError(
                    "worker addresses (--workers) come from the pods with kubernetes discovery"
                )
            if not self.namespace or not self.selector:
                raise ValueError(
                    "kubernetes discovery needs the worker pods' namespace and label selector "
                    "(--namespace, --selector)"
                )
            self.kubernetes_discovery()  # validates them
            return
        kubernetes_only = {
            "--namespace": self.namespace,
            "--selector": self.selector,
            "--kubeconfig": self.kubeconfig,
            "--worker-port": self.worker_port,
        }
        given = [flag for flag, value in kubernetes_only.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --discovery kubernetes")
        if not self.workers:
            raise ValueError("at least one expert worker address is needed (--workers)")
        for address in self.workers:
            parse_address(address)
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"worker addresses repeat: {', '.join(self.workers)}")

    def kubernetes_discovery(self) -> KubernetesDiscoveryConfig:
        """The pod watcher's configuration (kubernetes discovery only)."""
        from router.discovery import DEFAULT_WORKER_PORT, KubernetesDiscoveryConfig

        if self.discovery is not Discovery.KUBERNETES:
            raise ValueError(f"discovery is {self.discovery}, not kubernetes")
        return KubernetesDiscoveryConfig(
            namespace=self.namespace,
            selector=self.selector,
            port=DEFAULT_WORKER_PORT if self.worker_port is None else self.worker_port,
            kubeconfig=self.kubeconfig,
        )

    @property
    def dense_dtype(self) -> torch.dtype:
        """dtype of the router's dense part: float32 for fp32, bfloat16 for bf16 and fp8."""
        return torch.float32 if self.precision is Precision.FP32 else torch.bfloat16
