"""Worker loss on a real cluster: replicas take over, and without one `fail` or `degrade` applies.

The chaos test streams generations from several client threads while workers are killed, one
at a time (SIGKILL), and restarted in a loop, each back in routing before the next kill; every
request must finish with the tokens of a fault-free run.
It runs twice: with the router's own transport, and with forwarder processes sending every layer
to workers that have a front process. MOE_CHAOS_SECONDS sets how long the killing goes on
(default 60, each).
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time

import grpc
import hf_models
import numpy as np
import pytest
import torch

from moe_client import Client, ClusterError
from moe_cluster import LocalCluster
from moe_core.spec import ModelSpec
from router.model import MoELayer

ROUTER_ARGS = ("--max-batch-size", "16", "--max-seq-len", "128")
PROMPTS = [hf_models.random_prompt(n, seed=s) for n, s in ((9, 11), (4, 12), (13, 13), (6, 14))]
NEW_TOKENS = 12
CHAOS_SECONDS = float(os.environ.get("MOE_CHAOS_SECONDS", "60"))


def _generate_all(client: Client) -> list[list[int]]:
    return [client.generate(token_ids=p, max_new_tokens=NEW_TOKENS).token_ids for p in PROMPTS]


def _until_all_healthy(client: Client, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not all(w["healthy"] for w in client.info()["workers"]):
        assert time.monotonic() < deadline, client.info()["workers"]
        time.sleep(0.2)


def _retries_in_log(cluster: LocalCluster) -> int:
    return len(re.findall(r"out of routing", cluster.router.log_tail(lines=1_000_000)))


# the router's own transport; and forwarder processes (every layer) to workers with fronts
TRANSPORTS = {
    "event-loop": ((), ()),
    "forwarders-and-fronts": (
        ("--forwarders", "2", "--forwarder-min-mib", "0"),
        ("--fronts", "1"),
    ),
}


@pytest.mark.parametrize("transport", list(TRANSPORTS))
def test_replicas_keep_every_request_correct_while_workers_die_and_return(checkpoints, transport):
    model_dir = checkpoints.get("deepseek_v3")
    router_args, worker_args = TRANSPORTS[transport]
    with (
        LocalCluster(
            model_dir,
            workers=2,
            replicas=2,
            precision="fp32",
            router_args=(*ROUTER_ARGS, *router_args),
            worker_args=worker_args,
        ) as cluster,
        Client(cluster.address, timeout=120) as client,
    ):
        expected = _generate_all(client)
        stop = threading.Event()
        done, failures, lock = [0], [], threading.Lock()

        def stream_forever(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                i = rng.randrange(len(PROMPTS))
                try:
                    tokens = [
                        t
                        for chunk in client.stream(token_ids=PROMPTS[i], max_new_tokens=NEW_TOKENS)
                        for t in chunk.token_ids
                    ]
                except ClusterError as err:
                    tokens = err
                with lock:
                    if tokens != expected[i]:
                        failures.append((i, tokens))
                    done[0] += 1

        clients = [threading.Thread(target=stream_forever, args=(s,)) for s in range(3)]
        for thread in clients:
            thread.start()
        rng, kills = random.Random(0), 0
        end = time.monotonic() + CHAOS_SECONDS
        try:
            while time.monotonic() < end and not failures:
                victim = rng.randrange(cluster.num_workers)
                time.sleep(rng.uniform(0.2, 1.5))
                cluster.kill_worker(victim)
                kills += 1
                time.sleep(rng.uniform(0.2, 1.5))
                cluster.restart_worker(victim)
                # one failure at a time: the next kill may hit the other replica of this shard
                _until_all_healthy(client)
        finally:
            stop.set()
            for thread in clients:
                thread.join(timeout=180)
        retries = _retries_in_log(cluster)
        print(f"\nchaos: {done[0]} requests, {kills} kills, {retries} workers taken out of routing")
        assert not failures, f"{len(failures)} of {done[0]} requests went wrong: {failures[:3]}"
        assert kills >= max(1, CHAOS_SECONDS // 20) and done[0] >= 3 * kills  # restarts take s
        assert retries >= kills // 2  # the kills did hit requests in flight or about to be
        _until_all_healthy(client)  # the router's probes bring them back
        assert _generate_all(client) == expected


def _parse_ids(text: str) -> set[int]:
    """'8-11,14' -> {8, 9, 10, 11, 14}"""
    ids = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        ids.update(range(int(first), int(last or first) + 1))
    return ids


class DroppingBackend:
    """The in-process reference of degrade: experts in `dropped` leave every token's top-k and
    the kept weights are scaled up to the token's full routing weight."""

    staged_precision = None  # takes the top-k where it is

    def __init__(self, inner, dropped: set[int]) -> None:
        self.inner = inner
        self.dropped = torch.tensor(sorted(dropped), dtype=torch.int64)

    def dispatch(self, layer, x, topk_ids, topk_weights):
        lost = torch.isin(topk_ids, self.dropped)  # [T, k]
        kept = topk_weights.masked_fill(lost, 0.0)
        scale = topk_weights.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp(min=1e-12)
        return self.inner.dispatch(layer, x, topk_ids, kept * scale)

    def combine(self, handle):
        return self.inner.combine(handle)

    def take_dropped(self):
        return {}


@pytest.mark.parametrize("policy", ["degrade", "fail"])
def test_a_shard_without_live_worker_fails_or_degrades_as_configured(checkpoints, policy):
    model_dir = checkpoints.get("deepseek_v3")
    spec = ModelSpec.from_dir(model_dir)
    lost = set(range(spec.num_experts // 2, spec.num_experts))  # shard 1 of 2
    router_args = (*ROUTER_ARGS, "--on-expert-loss", policy)
    with (
        LocalCluster(model_dir, workers=2, precision="fp32", router_args=router_args) as cluster,
        Client(cluster.address, timeout=120) as client,
    ):
        exact = client.generate(token_ids=PROMPTS[0], max_new_tokens=4)
        assert exact.dropped_experts == ()
        cluster.kill_worker(1)
        if policy == "fail":
            for _ in range(2):  # the router survives the first failure
                with pytest.raises(ClusterError) as err:
                    client.generate(token_ids=PROMPTS[0], max_new_tokens=4)
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                named = re.search(r"serves experts ([\d,-]+)", err.value.details)
                assert named and _parse_ids(named.group(1)) <= lost, err.value.details
        else:
            result = client.generate(token_ids=PROMPTS[0], max_new_tokens=4)
            assert result.dropped_experts and set(result.dropped_experts) <= lost
            chunks = list(client.stream(token_ids=PROMPTS[0], max_new_tokens=4))
            assert set().union(*(c.dropped_experts for c in chunks)) == set(result.dropped_experts)
            with pytest.raises(ClusterError) as err:
                client.logits(PROMPTS[0])  # exact logits are not on offer now
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            scores = client.score(PROMPTS[0])
            assert scores.dropped_experts and set(scores.dropped_experts) <= lost
            model = hf_models.our_model(model_dir)
            for layer in model.modules():
                if isinstance(layer, MoELayer):
                    layer.experts = DroppingBackend(layer.experts, lost)
            with torch.no_grad():
                (want,) = hf_models.prefill_logits(model, [PROMPTS[0]])
            np.testing.assert_allclose(scores.logits, want.numpy(), rtol=0, atol=1e-4)
        cluster.restart_worker(1)
        deadline = time.monotonic() + 30
        while True:  # the router probes the worker back into routing
            try:
                back = client.generate(token_ids=PROMPTS[0], max_new_tokens=4)
                if not back.dropped_experts:
                    break
            except ClusterError:
                pass
            assert time.monotonic() < deadline, "the restarted worker never came back"
            time.sleep(0.2)
        assert back.token_ids == exact.token_ids


def test_a_hung_worker_costs_one_rpc_deadline_then_its_replica_serves(checkpoints):
    model_dir = checkpoints.get("deepseek_v3")
    router_args = (*ROUTER_ARGS, "--rpc-timeout", "2")
    with (
        LocalCluster(
            model_dir, workers=2, replicas=2, precision="fp32", router_args=router_args
        ) as cluster,
        Client(cluster.address, timeout=60) as client,
    ):
        expected = _generate_all(client)
        hung = cluster.workers[0]
        os.kill(hung.popen.pid, signal.SIGSTOP)  # alive, connected, silent
        try:
            started = time.monotonic()
            assert _generate_all(client) == expected
            assert time.monotonic() - started < 30
            workers = {w["address"]: w["healthy"] for w in client.info()["workers"]}
            assert workers.pop(hung.address) is False and all(workers.values())
        finally:
            os.kill(hung.popen.pid, signal.SIGCONT)
        _until_all_healthy(client)
        assert _generate_all(client) == expected
