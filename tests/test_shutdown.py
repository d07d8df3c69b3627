"""Graceful shutdown of real processes, as Kubernetes expects it: on SIGTERM a component reports
NOT_SERVING on health at once, refuses new calls with UNAVAILABLE, finishes the calls in flight
within its grace period, then exits with status 0.

One cluster (router + 1 worker); the router is stopped first, then the worker.
"""

from __future__ import annotations

import signal
import time

import grpc
import hf_models
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_cluster import LocalCluster
from moe_core import token_format as tf
from protos import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc

GRACE_S = 30
NEW_TOKENS = 120  # a generation that runs for a couple of seconds
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def cluster(checkpoints):
    grace = ("--grace", str(GRACE_S))
    with LocalCluster(
        checkpoints.get("deepseek_v3"),
        workers=1,
        router_args=("--max-seq-len", "256", *grace),
        worker_args=grace,
    ) as c:
        yield c


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_not_serving(channel: grpc.Channel, service: str) -> float:
    start = time.monotonic()
    while health(channel) != NOT_SERVING:
        assert time.monotonic() - start < 5.0, "health still SERVING 5 s after SIGTERM"
        time.sleep(0.01)
    assert health(channel, service) == NOT_SERVING
    return time.monotonic() - start


def test_router_on_sigterm_refuses_new_work_and_finishes_the_stream_in_flight(cluster):
    router = cluster.router.popen
    with grpc.insecure_channel(cluster.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        assert health(channel) == SERVING
        request = router_pb2.GenerateRequest(
            token_ids=hf_models.random_prompt(6, seed=5),
            max_new_tokens=NEW_TOKENS,
            ignore_eos=True,
        )
        stream = stub.Generate(request, timeout=60)
        chunks = [next(stream)]
        router.send_signal(signal.SIGTERM)
        wait_not_serving(channel, "moe_cluster.v1.RouterService")
        for call in (
            lambda: list(stub.Generate(router_pb2.GenerateRequest(token_ids=[1]), timeout=10)),
            lambda: stub.Logits(router_pb2.LogitsRequest(token_ids=[1, 2]), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
        assert router.poll() is None  # still draining
        chunks += list(stream)
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(tokens) == NEW_TOKENS
    assert chunks[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert router.wait(timeout=GRACE_S) == 0, cluster.router.log_tail()
    assert "stopped" in cluster.router.log_tail()


def test_worker_on_sigterm_refuses_new_work_and_finishes_the_calls_in_flight(cluster):
    worker = cluster.workers[0]
    gen = torch.Generator().manual_seed(0)
    tokens = 32768  # a batch that takes a few tenths of a second on a CPU
    x = torch.randn(tokens, 64, generator=gen)
    ids = torch.randint(0, 16, (tokens, 4), generator=gen)
    weights = torch.rand(tokens, 4, generator=gen)
    request = expert_pb2.ExpertForwardRequest(
        layer=1,
        tokens=tf.encode_tokens(x, "fp32"),
        slots=4,
        expert_ids=tf.pack_expert_ids(ids),
        expert_weights=tf.pack_expert_weights(weights),
        result_format=tf.FP32,
    )
    unlimited = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(worker.address, options=unlimited) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        want = tf.decode_result(stub.Forward(request, timeout=60).result)
        in_flight = [stub.Forward.future(request, timeout=60) for _ in range(4)]
        time.sleep(0.2)  # they have reached the worker: one computes, the others queue
        worker.popen.send_signal(signal.SIGTERM)
        wait_not_serving(channel, "moe_cluster.v1.ExpertService")
        with pytest.raises(grpc.RpcError) as err:
            stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in err.value.details()
        assert not all(f.done() for f in in_flight), "the batches ended before the test"
        for future in in_flight:
            assert torch.equal(tf.decode_result(future.result().result), want)
    assert worker.popen.wait(timeout=GRACE_S) == 0, worker.log_tail()
    assert "stopped" in worker.log_tail()
