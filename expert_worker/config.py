"""Configuration of an expert worker process, validated once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from expert_worker.experts import KERNELS
from moe_core.host_threads import check_cpu_threads
from moe_core.metrics import check_listen_options
from moe_core.precision import Precision


@dataclass
class WorkerConfig:
    """Everything an expert worker needs; `__post_init__` rejects values that cannot work.

    Expert ids are checked against the model (below its number of experts) when the shard loads.
    """

    model_dir: Path
    expert_ids: tuple[int, ...]  # global ids of the routed experts held, the same in every layer
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    port_file: Path | None = None  # written (temp + rename) with the bound port once serving
    device: str = "cpu"  # torch device of the expert weights, e.g. "cpu", "cuda", "cuda:1"
    cpu_threads: int | None = None  # torch's CPU operator threads; None: moe_core.host_threads
    precision: Precision = Precision.FP32  # how the expert weights are held; tokens must match
    grace_s: float = 5.0  # on SIGTERM/SIGINT, time given to calls in flight before they are cut
    kernels: str = "auto"  # fp8 expert MLP: "cuda" kernels, their "torch" twin, or "auto"
    metrics_port: int | None = None  # Prometheus /metrics on host:metrics_port; None = none
    metrics_port_file: Path | None = None  # written with the bound metrics port once serving
    # Forward calls computing or queued for the experts' thread; more get RESOURCE_EXHAUSTED
    max_concurrent_forwards: int = 16
    # processes that take calls on the same port beside the worker (expert_worker.front)
    fronts: int = 0

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        self.expert_ids = tuple(int(e) for e in self.expert_ids)
        if not self.expert_ids:
            raise ValueError("a worker must hold at least one expert")
        if min(self.expert_ids) < 0:
            raise ValueError(f"expert ids may not be negative, got {min(self.expert_ids)}")
        if len(set(self.expert_ids)) != len(self.expert_ids):
            raise ValueError(f"expert ids repeat: {list(self.expert_ids)}")
        self.expert_ids = tuple(sorted(self.expert_ids))
        check_listen_options(self)
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {self.device!r}") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        check_cpu_threads(self.cpu_threads)
        try:
            self.precision = Precision(self.precision)
        except ValueError as exc:
            choices = ", ".join(p.value for p in Precision)
            raise ValueError(f"precision must be one of {choices}, got {self.precision!r}") from exc
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.max_concurrent_forwards < 1:
            raise ValueError(
                f"max_concurrent_forwards must be at least 1, got {self.max_concurrent_forwards}"
            )
        if not 0 <= self.fronts <= 64:
            raise ValueError(f"fronts must be in 0-64, got {self.fronts}")
        if not self.grace_s >= 0:
            raise ValueError(f"grace_s may not be negative, got {self.grace_s}")
