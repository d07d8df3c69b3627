"""The router's worker pool against a real `expert_worker serve` process: membership changes
while calls to the worker are on their way.

A worker leaves the pool (its pod turned NotReady, say) while the router is still asking it
something. The calls already sent finish; a call that starts after it left fails as that worker's
failure, never as an exception that escapes to the router's request handler.
"""

import asyncio
import time

import pytest
from test_expert_worker import start_worker, stop, wait_for_port

from moe_core.precision import Precision
from moe_core.spec import ModelSpec
from router.workers import PoolConfig, WorkerPool

MODEL = "qwen3_moe"


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints.get(MODEL)


@pytest.fixture(scope="module")
def address(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("worker")
    process = start_worker(model, folder, "--shard", "0/1", "--precision", "fp32")
    try:
        yield f"127.0.0.1:{wait_for_port(process, folder)}"
    finally:
        stop(process, folder)


def test_calls_in_flight_when_a_worker_leaves_finish_and_later_ones_fail_cleanly(model, address):
    async def scenario() -> None:
        pool = WorkerPool(ModelSpec.from_dir(model), Precision.FP32, PoolConfig(leave_grace_s=5))
        await pool.start([address])
        (worker,) = pool.workers
        try:
            asking = [asyncio.create_task(WorkerPool.probe([worker], 5.0)) for _ in range(16)]
            for _ in range(3):  # probe's tasks start, then their calls are on their way
                await asyncio.sleep(0)
            await pool.set_workers(frozenset())
            assert pool.workers == [] and pool.unserved_experts()
            # sent before it left: answered
            assert await asyncio.gather(*asking) == [[True]] * 16
            # asked after it left: a failed probe, not an exception
            assert await WorkerPool.probe([worker], 1.0) == [False]
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_worker_that_leaves_and_returns_is_asked_again(model, address):
    async def scenario() -> None:
        pool = WorkerPool(ModelSpec.from_dir(model), Precision.FP32, PoolConfig(leave_grace_s=5))
        await pool.start([address])
        try:
            await pool.set_workers(frozenset())
            await pool.set_workers(frozenset([address]))
            for _ in range(100):  # the probe loop admits it within a probe interval
                if not pool.unserved_experts():
                    break
                await asyncio.sleep(0.05)
            assert not pool.unserved_experts()
            assert [w.address for w in pool.workers if w.healthy] == [address]
            assert await WorkerPool.probe(pool.workers, 5.0) == [True]
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


class CountingStub:
    """The worker's stub, counting the GetInfo calls that reach it."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.get_info_calls = 0

    def GetInfo(self, *args, **kwargs):
        self.get_info_calls += 1
        return self._stub.GetInfo(*args, **kwargs)


def test_frequent_reachability_questions_share_one_probe_per_interval(model, address):
    interval_s = 0.3

    async def scenario() -> None:
        config = PoolConfig(probe_interval_s=interval_s)
        pool = WorkerPool(ModelSpec.from_dir(model), Precision.FP32, config)
        await pool.start([address])
        (worker,) = pool.workers
        worker.stub = counting = CountingStub(worker.stub)
        try:
            asked = await asyncio.gather(*(pool.reachable([worker], 5.0) for _ in range(16)))
            assert asked == [[True]] * 16 and counting.get_info_calls == 1
            answered = time.monotonic()
            assert await pool.reachable([worker], 5.0) == [True]  # a fresh answer, reused
            assert counting.get_info_calls == 1 or time.monotonic() - answered >= interval_s
            await asyncio.sleep(interval_s)
            assert await pool.reachable([worker], 5.0) == [True]  # too old: asked again
            assert counting.get_info_calls == 2
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
