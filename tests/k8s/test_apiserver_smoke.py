"""The real kube-apiserver does what worker discovery relies on.

A test plays the kubelet: it creates an expert-worker pod, marks it Running and Ready at a loopback
address, and deletes it, while a label-selector watch sees ADDED, MODIFIED and DELETED. The
chart's own ServiceAccount, Role and RoleBinding are then applied to check that the router's
token may list and watch pods, and nothing more.
"""

from __future__ import annotations

import queue
import secrets
import threading
from datetime import datetime, timezone

import pytest

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import watch  # noqa: E402
from kubernetes.client import (  # noqa: E402
    ApiException,
    AuthenticationV1TokenRequest,
    RbacAuthorizationV1Api,
)

WORKER_LABELS = {
    "app.kubernetes.io/name": "moe-cluster",
    "app.kubernetes.io/instance": "smoke",
    "app.kubernetes.io/component": "expert-worker",
}
SELECTOR = ",".join(f"{k}={v}" for k, v in WORKER_LABELS.items())
POD_IP = "127.0.0.2"


def _namespace(core) -> str:
    name = f"moe-{secrets.token_hex(4)}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def _pod(name: str, labels: dict) -> dict:
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "expert-worker", "image": "moe-cluster:test"}]},
    }


def _kubelet_reports_ready(core, namespace: str, name: str) -> None:
    """What a kubelet does once the container passed its readiness probe."""
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {
        "status": {
            "phase": "Running",
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
            ],
        }
    }
    core.patch_namespaced_pod_status(
        name, namespace, status, _content_type="application/merge-patch+json"
    )


def _watch(core, namespace: str, resource_version: str, events: queue.Queue) -> None:
    """Puts (type, pod) of every event on `events` until the pod is gone; errors too."""
    stream = watch.Watch()
    try:
        for event in stream.stream(
            core.list_namespaced_pod,
            namespace,
            label_selector=SELECTOR,
            resource_version=resource_version,
            timeout_seconds=30,
        ):
            events.put((event["type"], event["raw_object"]))
            if event["type"] == "DELETED":
                break
    except Exception as err:  # reported to the test, which fails on it
        events.put(("ERROR", {"error": repr(err)}))
    finally:
        stream.stop()


def _next(events: queue.Queue) -> tuple[str, dict]:
    try:
        kind, pod = events.get(timeout=15)
    except queue.Empty:
        pytest.fail("the watch delivered no event within 15 s")
    assert kind != "ERROR", pod["error"]
    return kind, pod


def test_watch_with_label_selector_follows_a_worker_pod(kube_apiserver):
    assert kube_apiserver.url.startswith("https://127.0.0.1:")
    core = kube_apiserver.core_v1()
    namespace = _namespace(core)
    listed = core.list_namespaced_pod(namespace, label_selector=SELECTOR)
    assert listed.items == []

    events: queue.Queue = queue.Queue()
    watcher = threading.Thread(
        target=_watch, args=(core, namespace, listed.metadata.resource_version, events)
    )
    watcher.start()
    try:
        # A router pod in the same namespace must not show up in the workers' watch.
        router_labels = {**WORKER_LABELS, "app.kubernetes.io/component": "router"}
        core.create_namespaced_pod(namespace, _pod("smoke-router", router_labels))
        core.create_namespaced_pod(namespace, _pod("smoke-expert-worker-0", WORKER_LABELS))
        kind, pod = _next(events)
        assert (kind, pod["metadata"]["name"]) == ("ADDED", "smoke-expert-worker-0")
        assert pod["status"]["phase"] == "Pending" and "podIP" not in pod["status"]

        _kubelet_reports_ready(core, namespace, "smoke-expert-worker-0")
        kind, pod = _next(events)
        assert (kind, pod["metadata"]["name"]) == ("MODIFIED", "smoke-expert-worker-0")
        assert pod["status"]["phase"] == "Running" and pod["status"]["podIP"] == POD_IP
        ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert ready["Ready"] == "True"

        pods = core.list_namespaced_pod(namespace, label_selector=SELECTOR).items
        assert [(p.metadata.name, p.status.pod_ip) for p in pods] == [
            ("smoke-expert-worker-0", POD_IP)
        ]

        # Deleting first marks the pod terminating (MODIFIED with a deletionTimestamp), then
        # removes it (DELETED): discovery should drop a worker at the first of the two.
        core.delete_namespaced_pod("smoke-expert-worker-0", namespace, grace_period_seconds=0)
        kind, pod = _next(events)
        assert kind == "MODIFIED" and pod["metadata"]["deletionTimestamp"]
        kind, pod = _next(events)
        assert (kind, pod["metadata"]["name"]) == ("DELETED", "smoke-expert-worker-0")
        watcher.join(timeout=15)
        assert not watcher.is_alive()
        assert events.empty(), f"unexpected events: {list(events.queue)}"
    finally:
        core.delete_namespace(namespace)


def test_chart_rbac_lets_the_router_list_and_watch_pods_only(kube_apiserver):
    """The chart's ServiceAccount, Role and RoleBinding, applied as rendered."""
    helm = pytest.importorskip("helm_python")
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    core = kube_apiserver.core_v1()
    rbac = RbacAuthorizationV1Api(kube_apiserver.api_client())
    namespace = _namespace(core)
    try:
        chart = helm.Chart.load(str(Path(__file__).resolve().parents[2] / "helm" / "moe-cluster"))
        rendered = chart.render(
            {"model": {"path": "m"}}, name="smoke", namespace=namespace, is_install=True
        )
        docs = {
            doc["kind"]: doc
            for path, text in rendered.items()
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            if isinstance(doc, dict) and doc.get("kind")
        }
        account = docs["ServiceAccount"]
        core.create_namespaced_service_account(namespace, account)
        rbac.create_namespaced_role(namespace, docs["Role"])
        rbac.create_namespaced_role_binding(namespace, docs["RoleBinding"])
        router_pod = docs["Deployment"]["spec"]["template"]["spec"]
        assert router_pod["serviceAccountName"] == account["metadata"]["name"]

        # The API server issues the router's token itself (TokenRequest), no controller needed.
        token = core.create_namespaced_service_account_token(
            account["metadata"]["name"],
            namespace,
            AuthenticationV1TokenRequest(spec={"audiences": [], "expirationSeconds": 600}),
        ).status.token
        as_router = kube_apiserver.core_v1(token=token)

        core.create_namespaced_pod(namespace, _pod("smoke-expert-worker-0", WORKER_LABELS))
        args = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
        selector = args[args.index("--selector") + 1]
        pods = as_router.list_namespaced_pod(namespace, label_selector=selector).items
        assert [p.metadata.name for p in pods] == ["smoke-expert-worker-0"]
        as_router.read_namespaced_pod("smoke-expert-worker-0", namespace)
        stream = watch.Watch()
        for event in stream.stream(
            as_router.list_namespaced_pod, namespace, label_selector=selector, timeout_seconds=5
        ):
            assert (event["type"], event["object"].metadata.name) == (
                "ADDED",
                "smoke-expert-worker-0",
            )
            stream.stop()

        forbidden = [
            lambda: as_router.delete_namespaced_pod("smoke-expert-worker-0", namespace),
            lambda: as_router.list_namespaced_secret(namespace),
            lambda: as_router.list_namespaced_pod("kube-system"),
            lambda: as_router.create_namespaced_pod(namespace, _pod("intruder", WORKER_LABELS)),
        ]
        for call in forbidden:
            with pytest.raises(ApiException) as caught:
                call()
            assert caught.value.status == 403
    finally:
        core.delete_namespace(namespace)
