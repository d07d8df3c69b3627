"""Forwarder processes (`moe-router serve --forwarders N`): the router's Forward calls sent by
other processes through a shared host arena.

A real cluster on loopback: with forwarders the router serves exactly the logits it serves
without them (fp32 equal to the in-process model; fp8 bit for bit the same as the router's own
transport), counts the wire bytes per worker, survives a forwarder process killed mid-request and
a worker killed under it, and the arena hands out, reuses and grows its memory as it should.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import time
import urllib.request

import hf_models
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe_client import Client
from moe_cluster import LocalCluster
from moe_core.host_arena import HostArena, HostArenaError
from moe_core.precision import Precision
from router.dispatch import DispatchHandle, RemoteExpertBackend, WireTokens
from router.forwarders import ForwarderPool

MODEL = "deepseek_v3"
PROMPTS = [hf_models.random_prompt(11, seed=1), hf_models.random_prompt(7, seed=2)]
ROUTER_ARGS = ("--max-batch-size", "8", "--max-seq-len", "64")
NEW_TOKENS = 8


def _cluster(
    model_dir, forwarders: int, precision: str = "fp32", min_mib: float = 0, **kwargs
) -> LocalCluster:
    """min_mib 0: every layer goes through the forwarders."""
    args = (*ROUTER_ARGS, "--forwarders", str(forwarders), "--forwarder-min-mib", str(min_mib))
    return LocalCluster(model_dir, precision=precision, router_args=args, **kwargs)


def _all_logits(client: Client) -> np.ndarray:
    return np.concatenate([client.logits(p) for p in PROMPTS])


def _generate_all(client: Client) -> list[list[int]]:
    return [client.generate(token_ids=p, max_new_tokens=NEW_TOKENS).token_ids for p in PROMPTS]


def _forwarder_pids(cluster: LocalCluster) -> dict[int, int]:
    """Forwarder index -> pid of its latest process, from the router's log."""
    text = cluster.router.log_path.read_text()
    found = re.findall(r"forwarder process (\d+) started, pid (\d+)", text)
    return {int(index): int(pid) for index, pid in found}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_gone(pids, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        time.sleep(0.1)


def _router_samples(cluster: LocalCluster) -> list:
    with urllib.request.urlopen(cluster.router.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def _sent_bytes(cluster: LocalCluster) -> dict[str, float]:
    return {
        s.labels["worker"]: s.value
        for s in _router_samples(cluster)
        if s.name == "moe_router_dispatch_bytes_total" and s.labels.get("direction") == "sent"
    }


def _router_metric(cluster: LocalCluster, name: str) -> float:
    (value,) = [s.value for s in _router_samples(cluster) if s.name == name]
    return value


def test_forwarders_serve_the_same_logits_and_count_the_wire_bytes(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with torch.no_grad():
        want = hf_models.prefill_logits(hf_models.our_model(model_dir), PROMPTS)
    want = np.concatenate([w.numpy() for w in want])
    with _cluster(model_dir, 2, workers=3) as cluster, Client(cluster.address, timeout=60) as c:
        np.testing.assert_allclose(_all_logits(c), want, rtol=0, atol=1e-4)
        sent = _sent_bytes(cluster)
        assert set(sent) == {w.address for w in cluster.workers}
        assert all(v > 0 for v in sent.values()), sent
        pids = _forwarder_pids(cluster)
        assert len(pids) == 2
    assert not any(_alive(pid) for pid in pids.values())  # the router stopped them
    # fp8 tokens: the forwarders send exactly the bytes the router's own transport sends; with
    # a 400-byte floor the prefill layers (at least 7 rows of 68 bytes) go through the
    # forwarders and the decode layers (at most 3 rows) on the event loop, in the same requests
    got = {}
    for forwarders, min_mib in ((0, 0), (3, 0), (3, 400 / (1 << 20))):
        with (
            _cluster(model_dir, forwarders, "fp8", min_mib, workers=3) as cluster,
            Client(cluster.address, timeout=60) as client,
        ):
            got[forwarders, min_mib] = (_all_logits(client), _generate_all(client))
    for key, (logits, tokens) in got.items():
        np.testing.assert_array_equal(logits, got[0, 0][0], err_msg=str(key))
        assert tokens == got[0, 0][1], key


def test_a_killed_forwarder_process_is_replaced_and_no_request_is_lost(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with _cluster(model_dir, 2, workers=2) as cluster, Client(cluster.address, timeout=60) as c:
        expected = _generate_all(c)
        for round_ in range(3):
            pids = _forwarder_pids(cluster)
            os.kill(pids[round_ % 2], signal.SIGKILL)
            # the calls it held fail as UNAVAILABLE and go again; a new process takes them
            assert _generate_all(c) == expected
        deadline = time.monotonic() + 30
        while (
            len(re.findall("starting forwarder process", cluster.router.log_path.read_text())) < 3
        ):
            assert time.monotonic() < deadline, cluster.router.log_tail()
            time.sleep(0.1)
        assert _generate_all(c) == expected
        assert _router_metric(cluster, "moe_router_forwarder_starts_total") == 2 + 3
        assert _router_metric(cluster, "moe_router_host_arena_bytes") >= 64 << 20


def test_forwarders_exit_when_their_router_is_killed(checkpoints):
    """No orphans: a forwarder that loses its router (SIGKILL, no goodbye) exits by itself."""
    with _cluster(checkpoints.get(MODEL), 2, workers=1) as cluster:
        with Client(cluster.address, timeout=60) as client:
            client.logits(PROMPTS[0])
        pids = list(_forwarder_pids(cluster).values())
        cluster.router.popen.kill()
        cluster.router.popen.wait()
        _wait_gone(pids)


def test_a_worker_killed_under_the_forwarders_fails_over_to_its_replica(checkpoints):
    model_dir = checkpoints.get(MODEL)
    with (
        _cluster(model_dir, 2, workers=2, replicas=2) as cluster,
        Client(cluster.address, timeout=60) as client,
    ):
        check_failover(cluster, client)


def check_failover(cluster: LocalCluster, client: Client) -> None:
    """Worker 0 (which has a replica) killed, then started again: the same tokens throughout."""
    expected = _generate_all(client)
    cluster.kill_worker(0)
    assert _generate_all(client) == expected
    cluster.restart_worker(0)
    assert _generate_all(client) == expected


def test_the_arena_reuses_a_segment_once_its_blocks_return_and_grows_when_full():
    arena = HostArena(pin=False)
    shared = []
    arena.on_new_segment = shared.append
    try:
        a = arena.alloc(1000)
        b = arena.alloc(5000, holders=2)
        assert len(shared) == 1 and a.segment is b.segment and b.offset >= a.offset + 1000
        a.tensor()[:] = 7
        b.tensor()[:] = 9
        assert int(a.tensor()[:1000].sum()) == 7000  # distinct memory
        assert arena.locate(b.tensor()[10:20]) == (0, b.offset + 10)
        with pytest.raises(HostArenaError):
            arena.locate(torch.zeros(4, dtype=torch.uint8))
        big = arena.alloc(shared[0].size)  # does not fit: a second, larger segment
        assert big.segment is shared[1] and big.segment.size >= 2 * shared[0].size
        arena.release(a)
        arena.release(b)
        c = arena.alloc(100)
        assert c.offset > b.offset  # b still has a holder: the bump pointer stays
        arena.release(b)
        arena.release(c)
        d = arena.alloc(100)
        assert d.segment is shared[0] and d.offset == 0  # all returned: the segment is reused
        with pytest.raises(HostArenaError):
            arena.release(c)  # a block with no holder left
    finally:
        arena.close()
    with pytest.raises(HostArenaError):
        arena.alloc(10)


def test_a_handle_dropped_without_combine_returns_its_arena_blocks():
    """A step that fails between dispatch and combine must not leave its rows held forever."""
    pool = ForwarderPool(1, None, None, None, pin=False)
    try:
        tokens = WireTokens.of(torch.randn(6, 256), Precision.FP8)
        handle = DispatchHandle(0, torch.zeros(6, 256), torch.ones(6))
        data, scales = pool.stage(tokens, torch.tensor([5, 0, 3]), handle)
        assert torch.equal(data, tokens.data[[5, 0, 3]]) and torch.equal(
            scales, tokens.scales[[5, 0, 3]]
        )
        (segment,) = pool.arena.segments
        assert segment.live == 1
        del handle, data, scales
        gc.collect()
        assert segment.live == 0
    finally:
        pool.close()


def test_layers_below_the_floor_go_on_the_event_loop():
    forwarders = object()  # (only compared)
    backend = RemoteExpertBackend(
        None, None, Precision.FP8, 1.0, forwarders=forwarders, forwarded_min_bytes=1000
    )
    assert backend._transport(999) is backend.loop_transport
    assert backend._transport(1000) is forwarders
    without = RemoteExpertBackend(None, None, Precision.FP8, 1.0)
    assert without._transport(1 << 30) is without.loop_transport
