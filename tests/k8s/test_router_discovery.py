"""The router serving through Kubernetes discovery, against a real kube-apiserver.

Real expert worker processes listen on loopback addresses (127.0.0.2-4); the test plays the
kubelet, creating their pods and setting each pod's status (Ready or not, podIP). A real router
process (`--discovery kubernetes`) finds them, serves logits equal to the in-process reference, and
follows pods that become NotReady, are deleted, or come back. Its calls go through a forwarder
process, which must forget the workers that leave and reach the ones that join.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import hf_models
import numpy as np
import pytest
import torch

from moe_client import Client, ClusterError
from moe_core.spec import ModelSpec

from .test_discovery import SELECTOR, _kubelet_reports, _namespace, _ready_pod

ROOT = Path(__file__).resolve().parents[2]
MODEL = "deepseek_v3"
PROMPT = hf_models.random_prompt(9, seed=5)
WAIT_S = 30.0


def _spawn(name: str, args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    port_file = tmp_path / f"{name}.port"
    command = [sys.executable, "-m", *args, "--port", "0", "--port-file", str(port_file)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, port_file


def _port(proc: subprocess.Popen, port_file: Path, log: Path) -> int:
    deadline = time.monotonic() + 120
    while not port_file.is_file():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no port file; log:\n{log.read_text()}"
        time.sleep(0.05)
    return int(port_file.read_text())


def _until(check, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


@pytest.fixture
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_router_follows_worker_pods_and_serves_correct_logits(
    kube_apiserver, checkpoints, tmp_path, processes
):
    model = checkpoints.get(MODEL)
    half = ModelSpec.from_dir(model).num_experts // 2
    # shard 0 on .2; shard 1 on .3 and, as a spare, on .4
    ips = {"w0": ("127.0.0.2", 0), "w1": ("127.0.0.3", 1), "w2": ("127.0.0.4", 1)}
    ports = {}
    for name, (ip, shard) in ips.items():
        args = ["expert_worker", "serve", "--model", str(model), "--shard", f"{shard}/2"]
        proc, port_file = _spawn(name, [*args, "--host", ip, "--insecure"], tmp_path)
        processes.append(proc)
        ports[name] = (proc, port_file)
    ports = {n: _port(p, f, tmp_path / f"{n}.log") for n, (p, f) in ports.items()}
    address = {name: f"{ips[name][0]}:{ports[name]}" for name in ips}

    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    for name in ("w0", "w1"):
        _ready_pod(core, ns, name, ips[name][0], grpc_port=ports[name])
    router_args = ["router", "serve", "--model", str(model), "--discovery", "kubernetes"]
    router_args += ["--namespace", ns, "--selector", SELECTOR]
    router_args += ["--kubeconfig", str(kube_apiserver.kubeconfig), "--insecure"]
    router_args += ["--host", "127.0.0.1", "--max-seq-len", "64", "--startup-timeout", "60"]
    router_args += ["--forwarders", "1", "--forwarder-min-mib", "0"]
    router, port_file = _spawn("router", router_args, tmp_path)
    processes.insert(0, router)
    router_port = _port(router, port_file, tmp_path / "router.log")

    with torch.no_grad():
        (want,) = hf_models.prefill_logits(hf_models.our_model(model), [PROMPT])
    with Client(f"127.0.0.1:{router_port}", timeout=60) as client:

        def serving() -> set[str]:
            return {w["address"] for w in client.info()["workers"] if w["healthy"]}

        def assert_correct() -> None:
            np.testing.assert_allclose(client.logits(PROMPT), want.numpy(), rtol=0, atol=1e-4)

        assert serving() == {address["w0"], address["w1"]}
        assert_correct()

        # w1 fails its readiness probe: no pod serves shard 1 any more
        _kubelet_reports(core, ns, "w1", ips["w1"][0], ready=False)
        _until(lambda: serving() == {address["w0"]}, "the NotReady pod left")
        with pytest.raises(ClusterError) as err:
            client.logits(PROMPT)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"experts {half}-" in err.value.details or "serves experts" in err.value.details

        # a new pod for shard 1 appears
        _ready_pod(core, ns, "w2", ips["w2"][0], grpc_port=ports["w2"])
        _until(lambda: serving() == {address["w0"], address["w2"]}, "the new pod joined")
        assert_correct()

        # w2 is deleted (it first turns Terminating) and w1 is Ready again
        core.delete_namespaced_pod("w2", ns)
        _kubelet_reports(core, ns, "w1", ips["w1"][0], ready=True)
        _until(lambda: serving() == {address["w0"], address["w1"]}, "w1 back, w2 gone")
        assert_correct()
    with contextlib.suppress(Exception):
        core.delete_namespace(ns)
