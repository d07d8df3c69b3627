"""How many threads torch's CPU operators use in a serving process.

With its experts or dense layers on a GPU, a process does only small host-side tensor work
(routing plans, index lists, counts), and several such processes share one host: a router, its
forwarders, workers and their fronts. torch's default, an OpenMP pool of one thread per core in
every process, then costs more than it saves: each small operator wakes the whole pool, and the
pools of a dozen processes spin and wait on each other's cores. One thread is the default there.
On a CPU device the model's own matrix work runs on the host, and torch keeps its default; so
it does where OMP_NUM_THREADS is set (the local launcher shares a CPU's cores that way).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

GPU_DEFAULT = 1


def check_cpu_threads(requested: int | None) -> int | None:
    """requested, or ValueError when it is below 1 (None: the default, see `cpu_threads_for`)."""
    if requested is not None and requested < 1:
        raise ValueError(f"cpu threads must be at least 1, got {requested}")
    return requested


def cpu_threads_for(
    device: str | torch.device, requested: int | None = None, environ: Mapping = os.environ
) -> int | None:
    """The intra-op thread count to use: requested when given; else None (torch's default)
    where OMP_NUM_THREADS is set or the device is a CPU, GPU_DEFAULT for a GPU device."""
    if requested is not None:
        return check_cpu_threads(requested)
    if "OMP_NUM_THREADS" in environ or torch.device(device).type != "cuda":
        return None
    return GPU_DEFAULT


def apply_cpu_threads(device: str | torch.device, requested: int | None = None) -> int:
    """Sets torch's intra-op threads as `cpu_threads_for` says -> the count now in use."""
    threads = cpu_threads_for(device, requested)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
