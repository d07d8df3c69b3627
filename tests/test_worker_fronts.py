"""An expert worker with front processes (`--fronts 2`): the same service on the same port.

Connections land on one of the fronts (the kernel spreads them; the worker process itself does
not listen); the test opens many separate connections so that every front takes calls. Whichever
takes it, a Forward call answers bit for bit what a worker without fronts answers, GetInfo the
same, bad requests the same codes and messages, and the cluster serves the same logits through
forwarders and fronts. A killed front is replaced; SIGTERM stops the fronts with the worker.
Fronts and the router's forwarders load without torch, so that each helper process costs tens of
MiB, not hundreds.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import hf_models
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_expert_worker import BAD, HELD, make_request, routing, start_worker, stop, wait_for_port

from moe_client import Client
from moe_cluster import LocalCluster
from moe_core import token_format as tf
from moe_core import wire
from protos import expert_pb2, expert_pb2_grpc

MODEL = "qwen3_moe"
CONNECTIONS = 12


def _channels(port: int, count: int = CONNECTIONS) -> list[grpc.Channel]:
    """count channels with a connection each (no subchannel shared between them)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(count)]


def _front_pids(folder) -> list[int]:
    return [
        int(p)
        for p in re.findall(r"front process \d+ started, pid (\d+)", (folder / "log").read_text())
    ]


def _listening_pids(port: int) -> set[int]:
    """The processes with a TCP socket (IPv4 or IPv6) listening on port, from /proc."""
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()  # local address, remote address, state (0A: LISTEN)
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    sockets.add(f"socket:[{fields[9]}]")
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in sockets for fd in fd_dir.iterdir()):
                pids.add(int(fd_dir.parent.name))
        except OSError:  # a process that ended, or not ours to read
            continue
    return pids


@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints.get(MODEL)


@pytest.fixture(scope="module")
def workers(model, tmp_path_factory):
    """(port of a worker with 2 fronts, its folder, port of the same shard without fronts)."""
    folders = [tmp_path_factory.mktemp(name) for name in ("fronts", "plain")]
    args = ("--shard", "1/2", "--precision", "fp32")
    procs = [
        start_worker(model, folders[0], *args, "--fronts", "2", "--log-level", "INFO"),
        start_worker(model, folders[1], *args),
    ]
    try:
        ports = [wait_for_port(p, f) for p, f in zip(procs, folders, strict=True)]
        yield ports[0], folders[0], ports[1]
    finally:
        for proc, folder in zip(procs, folders, strict=True):
            stop(proc, folder)


def test_every_connection_answers_what_a_worker_without_fronts_answers(workers):
    port, folder, plain_port = workers
    (plain,) = _channels(plain_port, 1)
    want_stub = expert_pb2_grpc.ExpertServiceStub(plain)
    requests = [make_request(*routing(n, HELD, seed=n)) for n in (2, 7, 40)]
    requests.append(make_request(*routing(9, HELD, seed=3), result=tf.BF16))
    want = [want_stub.Forward(r, timeout=30) for r in requests]
    channels = _channels(port)
    try:
        for channel in channels:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            for request, expected in zip(requests, want, strict=True):
                got = stub.Forward(request, timeout=30)
                assert got.result == expected.result
            info = stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=30)
            assert list(info.expert_ids) == HELD and info.precision == "fp32"
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for channel in [*channels, plain]:
            channel.close()
    assert len(_front_pids(folder)) == 2
    # the fronts took some of the calls: the worker counted its own and theirs
    text = (folder / "log").read_text()
    assert "2 front processes" in text


def test_only_the_fronts_listen_so_the_worker_copies_no_calls_bytes(workers):
    port, folder, _ = workers
    fronts = [pid for pid in _front_pids(folder) if Path(f"/proc/{pid}").exists()]
    assert len(fronts) == 2
    assert _listening_pids(port) == set(fronts)


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests_get_the_same_answer_through_every_process(workers, case):
    port, _, _ = workers
    request, message = BAD[case]
    channels = _channels(port, 6)
    try:
        for channel in channels:
            with pytest.raises(grpc.RpcError) as info:
                expert_pb2_grpc.ExpertServiceStub(channel).Forward(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert message in info.value.details()
    finally:
        for channel in channels:
            channel.close()


def test_a_killed_front_is_replaced_and_the_worker_keeps_serving(workers):
    port, folder, _ = workers
    victim = _front_pids(folder)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(_front_pids(folder)) < 3:
        assert time.monotonic() < deadline, (folder / "log").read_text()[-2000:]
        time.sleep(0.1)
    request = make_request(*routing(5, HELD, seed=2))
    channels = _channels(port)
    try:
        for channel in channels:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            assert stub.Forward(request, timeout=30, wait_for_ready=True).result.num_tokens == 5
    finally:
        for channel in channels:
            channel.close()


def test_a_port_taken_by_another_process_fails_the_start_with_its_address(model, tmp_path):
    with socket.socket() as taken:  # listening, without SO_REUSEPORT: nobody may share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_worker(model, tmp_path, "--shard", "0/2", "--fronts", "2", "--port", str(port))
        try:
            proc.wait(timeout=60)
        finally:
            code, log = stop(proc, tmp_path)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in log, log
    assert not _front_pids(tmp_path)  # it failed before starting any front


def test_sigterm_stops_the_fronts_with_the_worker(model, tmp_path):
    proc = start_worker(model, tmp_path, "--shard", "0/2", "--fronts", "2", "--log-level", "INFO")
    wait_for_port(proc, tmp_path)
    pids = _front_pids(tmp_path)
    code, log = stop(proc, tmp_path)
    assert code == 0, log
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_cluster_through_forwarders_and_fronts_serves_the_same_logits(checkpoints):
    model_dir = checkpoints.get("deepseek_v3")
    prompts = [hf_models.random_prompt(11, seed=1), hf_models.random_prompt(7, seed=2)]
    with torch.no_grad():
        want = np.concatenate(
            [w.numpy() for w in hf_models.prefill_logits(hf_models.our_model(model_dir), prompts)]
        )
    router_args = ("--max-seq-len", "64", "--forwarders", "2", "--forwarder-min-mib", "0")
    with (
        LocalCluster(
            model_dir,
            workers=2,
            precision="fp32",
            router_args=router_args,
            worker_args=("--fronts", "2"),
        ) as cluster,
        Client(cluster.address, timeout=60) as client,
    ):
        got = np.concatenate([client.logits(p) for p in prompts])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_bytes_that_are_no_request_are_invalid_argument_through_every_process(workers):
    port, _, _ = workers
    channels = _channels(port, 6)
    try:
        for channel in channels:
            forward = channel.unary_unary(wire.FORWARD_METHOD)
            with pytest.raises(grpc.RpcError) as info:
                forward(b"\xff\xff\xff\xff not a message", timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid protobuf message (ExpertForwardRequest)" in info.value.details()
    finally:
        for channel in channels:
            channel.close()


@pytest.mark.parametrize("module", ["expert_worker.front", "router.forwarder"])
def test_helper_processes_run_without_torch(module):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        f"import {module}\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
