"""Prometheus /metrics of a real local cluster (router + 2 expert worker processes on loopback).

After a few requests the router's and the workers' counters move by exactly what was asked:
calls by outcome, tokens in and out, token timings, tokens routed to each expert (which the
workers' token-expert pairs add up to), bytes and calls per worker; a cancelled generation is
counted as cancelled; a dead worker shows up as failures and as unhealthy. The configs refuse
metrics options that cannot work.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections import defaultdict

import grpc
import hf_models
import pytest
from prometheus_client.parser import text_string_to_metric_families

from expert_worker.config import WorkerConfig
from moe_client import Client, ClusterError
from moe_cluster import LocalCluster
from moe_core.spec import ModelSpec
from router.config import RouterConfig

MODEL = "qwen3_moe"  # 16 experts, top-4, MoE layers 0 and 2 (layer 1 is dense)
ROUTER_ARGS = ("--max-batch-size", "8", "--max-seq-len", "256")
PROMPT_LENGTHS = (5, 9, 3)
NEW_TOKENS = 4
SCORED_LENGTH = 7


class Samples:
    """One scrape of a /metrics endpoint: sample values by name and labels."""

    def __init__(self, url: str) -> None:
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain")
            text = reply.read().decode()
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
        return sum(
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        """name's samples summed by the value of one label."""
        out: dict[str, float] = defaultdict(float)
        for s in self.samples:
            if s.name == name:
                out[s.labels[label]] += s.value
        return dict(out)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the metrics did not reach the expected values"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with LocalCluster(model_dir, workers=2, precision="fp32", router_args=ROUTER_ARGS) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with Client(cluster.address, timeout=120) as client:
        yield client


def scrape(cluster) -> tuple[Samples, list[Samples]]:
    return Samples(cluster.router.metrics_url), [Samples(w.metrics_url) for w in cluster.workers]


def test_every_process_serves_metrics_on_loopback(cluster):
    for proc in cluster.processes:
        assert proc.metrics_url.startswith("http://127.0.0.1:"), proc.name
    router, workers = scrape(cluster)
    assert router.get("process_resident_memory_bytes") > 0
    for worker in workers:
        assert worker.get("moe_worker_resident_weight_bytes") > 0


def test_counters_move_by_what_the_requests_asked(cluster, client, checkpoints):
    spec = ModelSpec.from_dir(checkpoints.get(MODEL))
    addresses = [w.address for w in cluster.workers]
    before, workers_before = scrape(cluster)

    generated = 0
    for i, length in enumerate(PROMPT_LENGTHS):
        prompt = hf_models.random_prompt(length, seed=10 + i)
        result = client.generate(token_ids=prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert len(result.token_ids) == NEW_TOKENS
        generated += len(result.token_ids)
    client.logits(hf_models.random_prompt(SCORED_LENGTH, seed=20))
    with pytest.raises(ClusterError) as err:
        client.generate(token_ids=[1, spec.vocab_size], max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT

    after, workers_after = scrape(cluster)
    d = lambda name, **labels: delta(after, before, name, **labels)  # noqa: E731
    generations = len(PROMPT_LENGTHS)
    assert d("moe_router_requests_total", method="Generate", outcome="ok") == generations
    assert d("moe_router_requests_total", method="Generate", outcome="invalid") == 1
    assert d("moe_router_requests_total", method="Logits", outcome="ok") == 1
    assert d("moe_router_requests_total", outcome="error") == 0
    assert d("moe_router_generated_tokens_total") == generated
    assert d("moe_router_prompt_tokens_total") == sum(PROMPT_LENGTHS) + SCORED_LENGTH
    assert d("moe_router_time_to_first_token_seconds_count") == generations
    assert d("moe_router_inter_token_latency_seconds_count") == generated - generations
    assert d("moe_router_request_latency_seconds_count", method="Generate") == generations
    assert d("moe_router_request_latency_seconds_count", method="Logits") == 1
    assert d("moe_router_request_latency_seconds_sum", method="Generate") > 0

    # every token the model ran: each prompt, each generated token but the last, the scored ones
    forwarded = sum(PROMPT_LENGTHS) + generations * (NEW_TOKENS - 1) + SCORED_LENGTH
    steps = d("moe_router_step_seconds_count")
    assert d("moe_router_step_tokens_sum") == forwarded
    assert d("moe_router_step_tokens_count") == d("moe_router_step_sequences_count") == steps > 0
    assert after.get("moe_router_requests_waiting") == after.get("moe_router_requests_running") == 0
    moe_layers = [str(layer) for layer in spec.moe_layers]
    expert_tokens = {
        layer: after.by("moe_router_expert_tokens_total", "layer")[layer]
        - before.by("moe_router_expert_tokens_total", "layer")[layer]
        for layer in moe_layers
    }
    assert expert_tokens == {layer: forwarded * spec.top_k for layer in moe_layers}
    per_expert = after.by("moe_router_expert_tokens_total", "expert")
    assert sorted(per_expert, key=int) == [str(e) for e in range(spec.num_experts)]
    layer_calls = after.by("moe_router_dispatch_combine_seconds_count", "layer")
    assert sorted(layer_calls) == sorted(moe_layers)
    assert d("moe_router_dispatch_combine_seconds_count") == steps * len(moe_layers)

    worker_pairs = 0.0
    for address, w_before, w_after in zip(addresses, workers_before, workers_after, strict=True):
        wd = lambda name, **labels: delta(w_after, w_before, name, **labels)  # noqa: E731,B023
        batches = wd("moe_worker_batches_total")
        assert batches > 0, address
        assert wd("moe_worker_compute_seconds_count") == batches
        assert wd("moe_worker_requests_total", method="Forward", outcome="ok") == batches
        assert d("moe_router_worker_call_seconds_count", worker=address) == batches
        assert d("moe_router_dispatch_bytes_total", worker=address, direction="sent") > 0
        assert d("moe_router_dispatch_bytes_total", worker=address, direction="received") > 0
        assert after.get("moe_router_worker_healthy", worker=address) == 1
        assert w_after.get("moe_worker_queue_depth") == 0
        assert wd("moe_worker_batch_tokens_sum") == wd("moe_worker_tokens_total") > 0
        worker_pairs += wd("moe_worker_expert_tokens_total")
    # each (token, expert) pair is computed by exactly one worker
    assert worker_pairs == sum(expert_tokens.values())
    assert d("moe_router_worker_failures_total") == 0


def test_a_generation_the_client_leaves_is_counted_cancelled(cluster, client):
    before, _ = scrape(cluster)
    chunks = client.stream(token_ids=[1, 2, 3], max_new_tokens=200, ignore_eos=True)
    next(chunks)
    chunks.close()  # cancels the call

    def settled() -> bool:
        after, _ = scrape(cluster)
        return (
            delta(
                after, before, "moe_router_requests_total", method="Generate", outcome="cancelled"
            )
            == 1
            and after.get("moe_router_requests_running") == 0
        )

    wait_until(settled)
    after, _ = scrape(cluster)
    assert delta(after, before, "moe_router_requests_total", method="Generate", outcome="ok") == 0


def test_a_dead_worker_shows_as_failures_and_unhealthy(cluster, client):
    victim = cluster.workers[1]
    survivor = cluster.workers[0]
    os.kill(victim.popen.pid, signal.SIGKILL)
    victim.popen.wait(timeout=30)
    with pytest.raises(ClusterError) as err:
        client.generate(token_ids=[1, 2, 3], max_new_tokens=2)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    router = Samples(cluster.router.metrics_url)
    assert router.get("moe_router_requests_total", method="Generate", outcome="unavailable") == 1
    assert router.get("moe_router_step_failures_total") >= 1
    assert router.get("moe_router_worker_failures_total", worker=victim.address) >= 1
    assert router.get("moe_router_worker_healthy", worker=victim.address) == 0
    assert router.get("moe_router_worker_failures_total", worker=survivor.address) == 0
    assert router.get("moe_router_worker_healthy", worker=survivor.address) == 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"metrics_port": 70000}, "metrics_port must be in 0-65535"),
        ({"port": 9090, "metrics_port": 9090}, "both 9090"),
        ({"metrics_port_file": "metrics.port"}, "needs a metrics port"),
    ],
)
def test_configs_refuse_metrics_options_that_cannot_work(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        RouterConfig(model_dir=tmp_path, workers="127.0.0.1:1", **options)
    with pytest.raises(ValueError, match=message):
        WorkerConfig(model_dir=tmp_path, expert_ids=(0,), **options)
