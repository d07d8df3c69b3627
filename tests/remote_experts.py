"""Our model in this process with its routed experts in real `expert_worker serve` processes.

`remote_model(model_dir, folder, workers, precision, device)` starts the workers (one shard
each, on loopback), joins them in a `WorkerPool` on an event-loop thread and yields the model
with a `RemoteExpertBackend` over them: the router's dispatch path without the router's server.
forwarders=N: every layer's calls go through N forwarder processes instead of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import torch
from test_expert_worker import start_worker, stop, wait_for_port

from moe_core.precision import Precision
from moe_core.spec import ModelSpec
from router.dispatch import RemoteExpertBackend
from router.forwarders import ForwarderPool
from router.model import MoEModel, load_model
from router.workers import CHANNEL_OPTIONS, PoolConfig, WorkerPool


@contextlib.contextmanager
def remote_model(
    model_dir: Path,
    folder: Path,
    workers: int,
    precision: str,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    forwarders: int = 0,
):
    """-> the model on `device` in `dtype`, its routed experts at `workers` worker processes
    holding them in `precision` (on `device` too)."""
    procs, addresses = [], []
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    pool = forwarder_pool = None

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)

    try:
        for i in range(workers):
            path = folder / f"worker{i}"
            path.mkdir()
            args = ("--shard", f"{i}/{workers}", "--precision", precision, "--device", device)
            procs.append((start_worker(model_dir, path, *args), path))
            addresses.append(f"127.0.0.1:{wait_for_port(*procs[-1], timeout=120)}")
        pool = WorkerPool(ModelSpec.from_dir(model_dir), Precision(precision), PoolConfig())
        run(pool.start(addresses))
        extra = {}
        if forwarders:
            pin = torch.device(device).type == "cuda"
            forwarder_pool = ForwarderPool(forwarders, None, None, CHANNEL_OPTIONS, pin)
            pool.attach(forwarder_pool)
            extra = {"forwarders": forwarder_pool, "forwarded_min_bytes": 0}
        backend = RemoteExpertBackend(pool, loop, Precision(precision), 60.0, **extra)
        model: MoEModel = load_model(model_dir, backend, device, dtype)
        yield model
    finally:
        if forwarder_pool is not None:
            forwarder_pool.close()
        if pool is not None:
            run(pool.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        for proc, path in procs:
            stop(proc, path)
