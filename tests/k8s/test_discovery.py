"""Kubernetes discovery of the expert workers against a real kube-apiserver.

The test plays the kubelet (it sets each pod's status: Running, Ready, a loopback pod IP) and
watches what `router.discovery.PodWatcher` hands to its sink, a recording stand-in for the
router's worker pool: pods are followed as they become Ready or NotReady, are deleted or come
back; a watch that expires (410 Gone) and an API server that restarts are survived. Pod IPs are
loopback addresses; the one test that connects to an address talks to a real worker process
listening there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest

from protos import expert_pb2, expert_pb2_grpc
from router.discovery import (
    DiscoveryError,
    KubernetesDiscoveryConfig,
    PodWatcher,
    load_api_client,
)

ROOT = Path(__file__).resolve().parents[2]
WORKER_LABELS = {
    "app.kubernetes.io/name": "moe-cluster",
    "app.kubernetes.io/instance": "discovery",
    "app.kubernetes.io/component": "expert-worker",
}
SELECTOR = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())
ROUTER_LABELS = {**WORKER_LABELS, "app.kubernetes.io/component": "router"}
DEFAULT_PORT = 7001  # the watcher's port for pods that name no "grpc" port
WAIT_S = 10.0


class RecordingSink:
    """Stands in for the router's worker pool: records each set of addresses it is handed."""

    def __init__(self) -> None:
        self.calls: list[frozenset[str]] = []
        self._changed = asyncio.Event()

    async def set_workers(self, addresses: frozenset[str]) -> None:
        assert isinstance(addresses, frozenset)
        self.calls.append(addresses)
        self._changed.set()

    @property
    def latest(self) -> frozenset[str] | None:
        return self.calls[-1] if self.calls else None

    async def wait_for(self, *expected: str, timeout: float = WAIT_S) -> None:
        """Until the newest set handed over is exactly `expected`."""
        want = frozenset(expected)
        deadline = time.monotonic() + timeout
        while self.latest != want:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"the sink never got {sorted(want)}; it got {self.history()}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def history(self) -> list[list[str]]:
        return [sorted(call) for call in self.calls]

    def assert_each_call_is_a_change(self) -> None:
        repeats = [a for a, b in zip(self.calls[:-1], self.calls[1:], strict=True) if a == b]
        assert not repeats, f"set_workers was called with an unchanged set: {self.history()}"


def _namespace(core) -> str:
    name = f"moe-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def _pod(name: str, labels: dict = WORKER_LABELS, grpc_port: int | None = None) -> dict:
    container = {"name": "expert-worker", "image": "moe-cluster:test"}
    if grpc_port is not None:  # as the chart declares it, after another port
        container["ports"] = [
            {"name": "metrics", "containerPort": 9090},
            {"name": "grpc", "containerPort": grpc_port},
        ]
    # A node name makes the pod "scheduled": the API server then keeps a deleted pod Terminating
    # (deletionTimestamp set) until the kubelet, here the test, confirms with a forced delete.
    spec = {"nodeName": "node-1", "containers": [container]}
    return {"metadata": {"name": name, "labels": labels}, "spec": spec}


def _kubelet_reports(core, namespace: str, name: str, ip: str, ready: bool = True) -> None:
    """What a kubelet writes for a running container that passes (or fails) its probe."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    flag = "True" if ready else "False"
    status = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
        ],
    }
    core.patch_namespaced_pod_status(
        name, namespace, {"status": status}, _content_type="application/merge-patch+json"
    )


def _ready_pod(core, namespace: str, name: str, ip: str, **pod_args) -> None:
    core.create_namespaced_pod(namespace, _pod(name, **pod_args))
    _kubelet_reports(core, namespace, name, ip)


def _config(kubeconfig: Path, namespace: str, **overrides) -> KubernetesDiscoveryConfig:
    fields = dict(
        namespace=namespace,
        selector=SELECTOR,
        port=DEFAULT_PORT,
        kubeconfig=kubeconfig,
        backoff_initial_s=0.1,
        backoff_max_s=0.5,
    )
    return KubernetesDiscoveryConfig(**{**fields, **overrides})


def _watch_threads(namespace: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"pod-watch-{namespace}"]


def _discovery_records(caplog, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "router.discovery" and r.levelno == level]


def test_lists_the_ready_pods_then_follows_pods_that_become_ready(kube_apiserver):
    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    # Before the watcher starts: one Ready worker (gRPC port declared) and one still Pending.
    _ready_pod(core, ns, "worker-0", "127.0.0.2", grpc_port=50071)
    core.create_namespaced_pod(ns, _pod("worker-1"))

    async def scenario() -> None:
        sink = RecordingSink()
        async with PodWatcher(_config(kube_apiserver.kubeconfig, ns), sink) as watcher:
            await watcher.wait_synced()
            assert sink.history() == [["127.0.0.2:50071"]]  # the first list, handed over once

            # A Ready router pod in the same namespace does not match the selector.
            _ready_pod(core, ns, "router-0", "127.0.0.9", labels=ROUTER_LABELS)
            _kubelet_reports(core, ns, "worker-1", "127.0.0.3")  # no "grpc" port: the default
            await sink.wait_for("127.0.0.2:50071", f"127.0.0.3:{DEFAULT_PORT}")
            _ready_pod(core, ns, "worker-2", "::1", grpc_port=50072)  # IPv6 gets brackets
            await sink.wait_for("127.0.0.2:50071", f"127.0.0.3:{DEFAULT_PORT}", "[::1]:50072")
            assert len(sink.calls) == 3, sink.history()

    asyncio.run(scenario())
    core.delete_namespace(ns)


def test_an_empty_namespace_is_reported_and_stopping_is_prompt(kube_apiserver):
    core = kube_apiserver.core_v1()
    ns = _namespace(core)

    async def scenario() -> None:
        sink = RecordingSink()
        # The API server would hold this watch open for five minutes.
        watcher = PodWatcher(_config(kube_apiserver.kubeconfig, ns, watch_timeout_s=300), sink)
        await watcher.start()
        await asyncio.wait_for(watcher.wait_synced(), WAIT_S)
        assert sink.calls == [frozenset()]
        await asyncio.sleep(0.5)  # the watch is open and idle now
        assert len(_watch_threads(ns)) == 1
        started = time.monotonic()
        await watcher.aclose()
        assert time.monotonic() - started < 2.0
        assert _watch_threads(ns) == []
        await watcher.aclose()  # idempotent

    asyncio.run(scenario())
    core.delete_namespace(ns)


def test_a_pod_that_turns_not_ready_leaves_and_returns_when_ready_again(kube_apiserver):
    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    a, b = f"127.0.0.2:{DEFAULT_PORT}", f"127.0.0.3:{DEFAULT_PORT}"

    async def scenario() -> None:
        sink = RecordingSink()
        async with PodWatcher(_config(kube_apiserver.kubeconfig, ns), sink):
            _ready_pod(core, ns, "worker-0", "127.0.0.2")
            _ready_pod(core, ns, "worker-1", "127.0.0.3")
            await sink.wait_for(a, b)
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=False)
            await sink.wait_for(b)
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=True)
            await sink.wait_for(a, b)
            sink.assert_each_call_is_a_change()

    asyncio.run(scenario())
    core.delete_namespace(ns)


def test_a_deleted_pod_leaves_when_it_starts_terminating_and_its_successor_comes_back(
    kube_apiserver,
):
    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    a, b = f"127.0.0.2:{DEFAULT_PORT}", f"127.0.0.3:{DEFAULT_PORT}"

    async def scenario() -> None:
        sink = RecordingSink()
        async with PodWatcher(_config(kube_apiserver.kubeconfig, ns), sink):
            _ready_pod(core, ns, "worker-0", "127.0.0.2")
            _ready_pod(core, ns, "worker-1", "127.0.0.3")
            await sink.wait_for(a, b)

            # A graceful delete: the pod is Terminating, still Ready in its status.
            core.delete_namespaced_pod("worker-0", ns, grace_period_seconds=30)
            await sink.wait_for(b)
            terminating = core.read_namespaced_pod("worker-0", ns)
            assert terminating.metadata.deletion_timestamp is not None
            assert terminating.status.pod_ip == "127.0.0.2"

            # The kubelet confirms (DELETED); the StatefulSet makes a new pod of the same name,
            # which comes up elsewhere.
            core.delete_namespaced_pod("worker-0", ns, grace_period_seconds=0)
            _ready_pod(core, ns, "worker-0", "127.0.0.4")
            await sink.wait_for(b, f"127.0.0.4:{DEFAULT_PORT}")
            core.delete_namespaced_pod("worker-1", ns, grace_period_seconds=0)
            await sink.wait_for(f"127.0.0.4:{DEFAULT_PORT}")
            sink.assert_each_call_is_a_change()

    asyncio.run(scenario())
    core.delete_namespace(ns)


def _compact_etcd(etcd_url: str, revision: int) -> None:
    """Drops etcd's history before `revision`: older resourceVersions cannot be watched."""
    body = json.dumps({"revision": str(revision), "physical": True}).encode()
    request = urllib.request.Request(f"{etcd_url}/v3/kv/compaction", data=body, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(request, timeout=10) as response:
        assert response.status == 200


def test_an_expired_watch_is_relisted_and_following_goes_on(own_kube_apiserver, caplog):
    # Without the watch cache, watches are served by etcd, whose compaction expires them.
    server = own_kube_apiserver("--watch-cache=false")
    core = server.info.core_v1()
    ns = _namespace(core)
    a, b = f"127.0.0.2:{DEFAULT_PORT}", f"127.0.0.3:{DEFAULT_PORT}"
    caplog.set_level(logging.INFO, logger="router.discovery")

    async def scenario() -> None:
        sink = RecordingSink()
        # Short watches, so that the watcher soon resumes from the resourceVersion it holds.
        config = _config(server.info.kubeconfig, ns, watch_timeout_s=1)
        async with PodWatcher(config, sink):
            _ready_pod(core, ns, "worker-0", "127.0.0.2")
            await sink.wait_for(a)
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=False)
            _ready_pod(core, ns, "worker-1", "127.0.0.3")
            # Writes the watch does not see move etcd's revision past the watcher's; compact there.
            core.create_namespaced_config_map(ns, {"metadata": {"name": "unrelated-0"}})
            newest = core.create_namespaced_config_map(ns, {"metadata": {"name": "unrelated-1"}})
            _compact_etcd(server.info.etcd_url, int(newest.metadata.resource_version))

            deadline = time.monotonic() + WAIT_S
            while not any("410" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the watch never expired"
                await asyncio.sleep(0.05)
            await sink.wait_for(b)  # the state after the relist
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=True)
            await sink.wait_for(a, b)  # and the watch from the relist follows changes

    asyncio.run(scenario())
    assert _discovery_records(caplog, logging.WARNING) == []  # an expiry is no outage


def test_survives_an_api_server_restart(own_kube_apiserver, caplog):
    server = own_kube_apiserver()
    core = server.info.core_v1()
    ns = _namespace(core)
    a, b, c = (f"127.0.0.{i}:{DEFAULT_PORT}" for i in (2, 3, 4))
    caplog.set_level(logging.INFO, logger="router.discovery")

    async def scenario() -> None:
        sink = RecordingSink()
        async with PodWatcher(_config(server.info.kubeconfig, ns), sink):
            _ready_pod(core, ns, "worker-0", "127.0.0.2")
            _ready_pod(core, ns, "worker-1", "127.0.0.3")
            await sink.wait_for(a, b)
            calls = len(sink.calls)

            await asyncio.to_thread(server.stop_apiserver, crash=True)
            await asyncio.sleep(1.5)  # several failed attempts, with backoff up to 0.5 s
            assert len(sink.calls) == calls  # the known workers stay while the API is away
            warnings = _discovery_records(caplog, logging.WARNING)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once per outage

            await asyncio.to_thread(server.start_apiserver)
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=False)
            _ready_pod(core, ns, "worker-2", "127.0.0.4")
            await sink.wait_for(b, c)
            _kubelet_reports(core, ns, "worker-0", "127.0.0.2", ready=True)
            await sink.wait_for(a, b, c)

    asyncio.run(scenario())
    assert any("answers again" in r.getMessage() for r in caplog.records)


def _chart_rbac(namespace: str) -> dict[str, dict]:
    """The chart's ServiceAccount, Role, RoleBinding and router Deployment, rendered."""
    helm = pytest.importorskip("helm_python")
    yaml = pytest.importorskip("yaml")
    chart = helm.Chart.load(str(ROOT / "helm" / "moe-cluster"))
    rendered = chart.render(
        {"model": {"path": "m"}}, name="discovery", namespace=namespace, is_install=True
    )
    return {
        doc["kind"]: doc
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if isinstance(doc, dict) and doc.get("kind")
    }


def test_the_chart_rbac_is_all_the_watcher_needs(kube_apiserver, tmp_path):
    from kubernetes.client import AuthenticationV1TokenRequest, RbacAuthorizationV1Api

    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    docs = _chart_rbac(ns)
    account = docs["ServiceAccount"]["metadata"]["name"]
    core.create_namespaced_service_account(ns, docs["ServiceAccount"])
    rbac = RbacAuthorizationV1Api(kube_apiserver.api_client())
    rbac.create_namespaced_role(ns, docs["Role"])
    rbac.create_namespaced_role_binding(ns, docs["RoleBinding"])
    token = core.create_namespaced_service_account_token(
        account, ns, AuthenticationV1TokenRequest(spec={"audiences": [], "expirationSeconds": 600})
    ).status.token
    kubeconfig = tmp_path / "router-kubeconfig"
    config = json.loads(kube_apiserver.kubeconfig.read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    kubeconfig.write_text(json.dumps(config))

    # The router's arguments, as the chart passes them.
    args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--discovery") + 1] == "kubernetes"
    assert args[args.index("--namespace") + 1] == ns
    selector = args[args.index("--selector") + 1]
    # A worker pod as the chart's StatefulSet makes it.
    template = docs["StatefulSet"]["spec"]["template"]
    ports = template["spec"]["containers"][0]["ports"]
    grpc_port = next(p["containerPort"] for p in ports if p["name"] == "grpc")
    pod = _pod("discovery-expert-worker-0", labels=template["metadata"]["labels"])
    pod["spec"]["containers"][0]["ports"] = ports

    async def scenario() -> None:
        sink = RecordingSink()
        async with PodWatcher(_config(kubeconfig, ns, selector=selector), sink):
            core.create_namespaced_pod(ns, pod)
            _kubelet_reports(core, ns, "discovery-expert-worker-0", "127.0.0.2")
            await sink.wait_for(f"127.0.0.2:{grpc_port}")

    asyncio.run(scenario())
    core.delete_namespace(ns)


class InfoSink:
    """Asks each new worker which experts it holds, as the router's pool does."""

    def __init__(self) -> None:
        self.experts: dict[str, list[int]] = {}
        self.ready = asyncio.Event()

    async def set_workers(self, addresses: frozenset[str]) -> None:
        for address in sorted(addresses - self.experts.keys()):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                info = await stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)
                self.experts[address] = list(info.expert_ids)
        if addresses:
            self.ready.set()


def test_a_discovered_address_reaches_the_worker_listening_there(
    kube_apiserver, checkpoints, tmp_path
):
    model = checkpoints.get("qwen3_moe")
    port_file = tmp_path / "port"
    command = [sys.executable, "-m", "expert_worker", "serve", "--model", str(model)]
    command += ["--experts", "0-7", "--host", "127.0.0.2", "--port", "0"]
    command += ["--port-file", str(port_file), "--insecure"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "log", "w") as log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    core = kube_apiserver.core_v1()
    ns = _namespace(core)
    try:
        deadline = time.monotonic() + 60
        while not port_file.is_file():
            assert worker.poll() is None, (tmp_path / "log").read_text()
            assert time.monotonic() < deadline, "the worker wrote no port file"
            time.sleep(0.05)
        port = int(port_file.read_text())

        async def scenario() -> dict[str, list[int]]:
            sink = InfoSink()
            async with PodWatcher(_config(kube_apiserver.kubeconfig, ns), sink):
                _ready_pod(core, ns, "worker-0", "127.0.0.2", grpc_port=port)
                await asyncio.wait_for(sink.ready.wait(), WAIT_S)
            return sink.experts

        assert asyncio.run(scenario()) == {f"127.0.0.2:{port}": list(range(8))}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        core.delete_namespace(ns)


def test_configuration_errors_are_discovery_errors(tmp_path, monkeypatch):
    with pytest.raises(DiscoveryError, match="does not exist"):
        load_api_client(tmp_path / "missing")
    (tmp_path / "broken").write_text("{}")
    with pytest.raises(DiscoveryError, match="broken"):
        load_api_client(tmp_path / "broken")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(DiscoveryError, match="--kubeconfig"):
        load_api_client(None)
