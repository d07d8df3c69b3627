"""Backpressure, limits, deadlines and cancellation on a real cluster (router + 1 worker process).

The router has 8 KV slots, takes 8 requests at once and lets 8 more wait: a burst of 200 gets
RESOURCE_EXHAUSTED fast for the excess while the accepted ones finish with the tokens they give
alone, and the router's memory stays put. A request whose client cancels or whose deadline
passes gives its KV slot and its place back at once, whether it was running or waiting. The
worker takes 2 Forward calls at once (--max-concurrent-forwards 2) and refuses more.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter

import grpc
import hf_models
import pytest
import torch

from moe_client import Client, ClusterError
from moe_cluster import LocalCluster
from moe_core import token_format as tf
from protos import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc

SLOTS = MAX_CONCURRENT = MAX_WAITING = 8
MAX_PROMPT_LEN, MAX_NEW_TOKENS = 64, 200
ROUTER_ARGS = (
    *("--max-batch-size", str(SLOTS), "--max-seq-len", "256"),
    *("--max-concurrent-requests", str(MAX_CONCURRENT), "--max-waiting", str(MAX_WAITING)),
    *("--max-prompt-len", str(MAX_PROMPT_LEN), "--max-new-tokens", str(MAX_NEW_TOKENS)),
)
PROMPTS = [hf_models.random_prompt(4 + i, seed=40 + i) for i in range(5)]
BURST, BURST_NEW_TOKENS = 200, 64
LONG = 150  # new tokens of a generation that runs for seconds
MAX_FORWARDS = 2


@pytest.fixture(scope="module")
def cluster(checkpoints):
    with LocalCluster(
        checkpoints.get("deepseek_v3"),
        workers=1,
        router_args=ROUTER_ARGS,
        worker_args=("--max-concurrent-forwards", str(MAX_FORWARDS)),
    ) as c:
        yield c


@pytest.fixture(scope="module")
def stub(cluster):
    with grpc.insecure_channel(cluster.address) as channel:
        yield router_pb2_grpc.RouterServiceStub(channel)


def load(stub) -> router_pb2.RouterLoad:
    return stub.GetInfo(router_pb2.ClusterInfoRequest(), timeout=10).load


def wait_for_load(stub, timeout_s: float = 5.0, **want) -> float:
    """Polls GetInfo until its load has the wanted values -> seconds it took."""
    start = time.monotonic()
    while True:
        now = load(stub)
        if all(getattr(now, name) == value for name, value in want.items()):
            return time.monotonic() - start
        assert time.monotonic() - start < timeout_s, f"load {now} never reached {want}"
        time.sleep(0.01)


def long_request(prompt=PROMPTS[0]) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(token_ids=prompt, max_new_tokens=LONG, ignore_eos=True)


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_limits_are_reported_and_enforced(cluster, stub):
    with Client(cluster.address, timeout=30) as client:
        info = client.info()
    assert info["limits"] == {
        "max_seq_len": 256,
        "max_prompt_len": MAX_PROMPT_LEN,
        "max_new_tokens": MAX_NEW_TOKENS,
        "max_concurrent_requests": MAX_CONCURRENT,
        "max_waiting": MAX_WAITING,
        "max_request_bytes": 4 * 1024 * 1024,
    }
    assert info["load"] == {"kv_slots": SLOTS, "free_kv_slots": SLOTS, "running": 0, "waiting": 0}
    refused = {
        "prompt over --max-prompt-len": (
            router_pb2.GenerateRequest(token_ids=[1] * (MAX_PROMPT_LEN + 1)),
            grpc.StatusCode.OUT_OF_RANGE,
            "the prompt has 65 tokens, more than this router's limit 64 (--max-prompt-len)",
        ),
        "max_new_tokens over the limit": (
            router_pb2.GenerateRequest(token_ids=[1], max_new_tokens=MAX_NEW_TOKENS + 1),
            grpc.StatusCode.OUT_OF_RANGE,
            "max_new_tokens 201 exceeds this router's limit 200",
        ),
        "a message over 4 MiB": (
            router_pb2.GenerateRequest(token_ids=[1] * (4 * 1024 * 1024)),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    }
    for what, (request, code, message) in refused.items():
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(request, timeout=30))
        assert err.value.code() == code, (what, err.value.details())
        assert message in err.value.details(), what
    # exactly at the limits is fine
    request = router_pb2.GenerateRequest(token_ids=[1] * MAX_PROMPT_LEN, max_new_tokens=2)
    assert sum(len(c.token_ids) for c in stub.Generate(request, timeout=30)) <= 2


def test_a_burst_over_capacity_is_refused_fast_and_the_accepted_finish(cluster, stub):
    with Client(cluster.address, timeout=60) as client:
        alone = [
            client.generate(token_ids=p, max_new_tokens=BURST_NEW_TOKENS, ignore_eos=True).token_ids
            for p in PROMPTS
        ]
    rss_before = vm_rss_kib(cluster.router.popen.pid)

    async def burst():
        async with grpc.aio.insecure_channel(cluster.address) as channel:
            aio_stub = router_pb2_grpc.RouterServiceStub(channel)
            peak = {"running": 0, "waiting": 0}
            done = asyncio.Event()

            async def watch():  # the load the router reports while the burst runs
                while not done.is_set():
                    info = await aio_stub.GetInfo(router_pb2.ClusterInfoRequest(), timeout=10)
                    for name in peak:
                        peak[name] = max(peak[name], getattr(info.load, name))
                    await asyncio.sleep(0.02)

            async def one(i: int):
                request = router_pb2.GenerateRequest(
                    token_ids=PROMPTS[i % len(PROMPTS)],
                    max_new_tokens=BURST_NEW_TOKENS,
                    ignore_eos=True,
                )
                start = time.monotonic()
                try:
                    chunks = [c async for c in aio_stub.Generate(request, timeout=60)]
                except grpc.aio.AioRpcError as err:
                    return i, err.code(), err.details(), time.monotonic() - start
                tokens = [t for c in chunks for t in c.token_ids]
                return i, grpc.StatusCode.OK, tokens, time.monotonic() - start

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(one(i) for i in range(BURST)))
            done.set()
            await watcher
            return results, peak

    results, peak = asyncio.run(burst())
    codes = Counter(code for _, code, _, _ in results)
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    # each accepted generation takes many steps, so the burst finds every place taken
    assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= BURST // 2, codes
    assert peak["running"] <= MAX_CONCURRENT and peak["waiting"] <= MAX_WAITING, peak
    accepted = [(i, out, s) for i, code, out, s in results if code == grpc.StatusCode.OK]
    for i, tokens, _ in accepted:
        assert tokens == alone[i % len(PROMPTS)], i
    refused = [(details, s) for _, code, details, s in results if code != grpc.StatusCode.OK]
    assert all("--max-concurrent-requests 8, --max-waiting 8" in d for d, _ in refused)
    refusal_s = sorted(s for _, s in refused)
    accepted_s = sorted(s for _, _, s in accepted)
    # Refused at once, not after waiting for a place: every refusal comes before most accepted
    # generations (BURST_NEW_TOKENS steps each, half of them after waiting for a slot) finish.
    # How long the burst's arrival takes depends on the machine, so no absolute bound beyond that.
    assert refusal_s[-1] < statistics.median(accepted_s), (refusal_s[-5:], accepted_s[:5])
    wait_for_load(stub, running=0, waiting=0, free_kv_slots=SLOTS)
    grown_mib = (vm_rss_kib(cluster.router.popen.pid) - rss_before) / 1024
    assert grown_mib < 64, f"the router's RSS grew by {grown_mib:.0f} MiB over the burst"


def test_cancelled_streams_give_their_kv_slots_and_places_back_at_once(cluster, stub):
    running = [stub.Generate(long_request(), timeout=60) for _ in range(MAX_CONCURRENT)]
    try:
        for call in running:
            next(call)  # each has its first token: it runs, holding a KV slot
        waiting = stub.Generate(long_request(), timeout=60)
        wait_for_load(stub, running=MAX_CONCURRENT, waiting=1, free_kv_slots=0)
        waiting.cancel()
        wait_for_load(stub, timeout_s=1.0, running=MAX_CONCURRENT, waiting=0)
        running[0].cancel()  # a client that stops reading and cancels
        running[1].cancel()
        took = wait_for_load(stub, running=MAX_CONCURRENT - 2, free_kv_slots=2)
        assert took < 1.0, f"freeing two slots took {took:.2f} s"
    finally:
        for call in running:
            call.cancel()
    took = wait_for_load(stub, running=0, waiting=0, free_kv_slots=SLOTS)
    # a generation of LONG tokens would run for seconds: the slots came back when cancelled
    assert took < 1.0, f"freeing the slots took {took:.2f} s"


def test_an_expired_deadline_is_deadline_exceeded_and_frees_its_slot(cluster, stub):
    with Client(cluster.address, timeout=0.5) as client:
        start = time.monotonic()
        with pytest.raises(ClusterError) as err:
            client.generate(token_ids=PROMPTS[1], max_new_tokens=LONG, ignore_eos=True)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - start < 2.0
    assert wait_for_load(stub, running=0, free_kv_slots=SLOTS) < 1.0
    # a request still waiting for a place when its deadline passes leaves the line
    running = [stub.Generate(long_request(), timeout=60) for _ in range(MAX_CONCURRENT)]
    try:
        for call in running:
            next(call)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request(), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_for_load(stub, running=MAX_CONCURRENT, waiting=0) < 1.0
    finally:
        for call in running:
            call.cancel()
    wait_for_load(stub, running=0, waiting=0, free_kv_slots=SLOTS)
    with Client(cluster.address, timeout=60) as client:  # and the router serves as before
        assert len(client.generate(token_ids=PROMPTS[2], max_new_tokens=3).token_ids) <= 3


def test_a_worker_refuses_forward_calls_over_its_limit_and_keeps_serving(cluster):
    gen = torch.Generator().manual_seed(0)
    # 8192 tokens, each sent to all 16 experts: several tenths of a second of compute on a CPU
    # for 2 MiB of tokens, so the calls arrive while the first ones still compute
    tokens, slots = 8192, 16
    request = expert_pb2.ExpertForwardRequest(
        layer=1,  # the tiny DeepSeek-V3's first MoE layer
        tokens=tf.encode_tokens(torch.randn(tokens, 64, generator=gen), "fp32"),
        slots=slots,
        expert_ids=tf.pack_expert_ids(torch.randperm(16, generator=gen).repeat(tokens, 1)),
        expert_weights=tf.pack_expert_weights(torch.rand(tokens, slots, generator=gen)),
        result_format=tf.FP32,
    )
    unlimited = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(cluster.workers[0].address, options=unlimited) as channel:
        stub = expert_pb2_grpc.ExpertServiceStub(channel)
        want = tf.decode_result(stub.Forward(request, timeout=60).result)
        start = time.monotonic()
        ended: dict[int, float] = {}
        calls = [stub.Forward.future(request, timeout=60) for _ in range(12)]
        for i, call in enumerate(calls):
            call.add_done_callback(lambda _, i=i: ended.setdefault(i, time.monotonic() - start))
        accepted, refused = {}, []
        for i, call in enumerate(calls):
            try:
                accepted[i] = call.result().result
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
                assert f"--max-concurrent-forwards {MAX_FORWARDS}" in err.details()
                refused.append(i)
        assert len(accepted) >= MAX_FORWARDS and len(refused) >= 4, (len(accepted), len(refused))
        for result in accepted.values():
            assert torch.equal(tf.decode_result(result), want)
        while len(ended) < len(calls):  # the last callbacks may still be running
            time.sleep(0.01)
        # refused at once, before the accepted ones have computed
        assert max(ended[i] for i in refused) < max(ended[i] for i in accepted)
        assert stub.Forward(request, timeout=60).result.num_tokens == tokens
