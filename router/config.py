"""Configuration of the router service, validated once when it is built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core.precision import Precision


def parse_address(address: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 hosts in brackets) -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a port in 1-65535, got {address!r}")
    return host, int(port)


@dataclass
class RouterConfig:
    """Everything a router process needs; `__post_init__` rejects values that cannot work."""

    model_dir: Path
    workers: tuple[str, ...]  # HOST:PORT of each expert worker
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    port_file: Path | None = None  # written (temp + rename) with the bound port once serving
    device: str = "cpu"  # torch device of the dense part and the KV cache
    precision: Precision = Precision.FP32  # dense dtype and dispatch format (see `dense_dtype`)
    max_batch_size: int = 64  # sequences per step = KV cache slots
    max_seq_len: int = 4096  # prompt + generated tokens per sequence
    max_new_tokens: int = 4096  # the most tokens one request may ask for
    default_max_new_tokens: int = 16  # when a request leaves max_new_tokens at 0
    max_step_tokens: int | None = None  # new tokens per step; None = max(8192, max_seq_len)
    rpc_timeout_s: float = 60.0  # deadline of every call to an expert worker

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if isinstance(self.workers, str):
            self.workers = tuple(w for w in self.workers.split(",") if w)
        self.workers = tuple(self.workers)
        if not self.workers:
            raise ValueError("at least one expert worker address is needed")
        for address in self.workers:
            parse_address(address)
        if len(set(self.workers)) != len(self.workers):
            raise ValueError(f"worker addresses repeat: {', '.join(self.workers)}")
        if not self.host:
            raise ValueError("host may not be empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0-65535, got {self.port}")
        if self.port_file is not None:
            self.port_file = Path(self.port_file)
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {self.device!r}") from exc
        self.precision = Precision(self.precision)
        for name in ("max_batch_size", "max_seq_len", "max_new_tokens", "default_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        if self.max_step_tokens is None:
            self.max_step_tokens = max(8192, self.max_seq_len)
        if self.max_step_tokens < self.max_seq_len:
            raise ValueError(
                f"max_step_tokens ({self.max_step_tokens}) must be at least max_seq_len "
                f"({self.max_seq_len}) so that any prompt fits in one step"
            )
        if not self.rpc_timeout_s > 0:
            raise ValueError(f"rpc_timeout_s must be positive, got {self.rpc_timeout_s}")

    @property
    def dense_dtype(self) -> torch.dtype:
        """dtype of the router's dense part: float32 for fp32, bfloat16 for bf16 and fp8."""
        return torch.float32 if self.precision is Precision.FP32 else torch.bfloat16
