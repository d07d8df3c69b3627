"""Kubernetes discovery of the expert workers: the addresses of the worker pods that are Ready.

    watcher = PodWatcher(KubernetesDiscoveryConfig(namespace="moe", selector="app=w"), pool)
    await watcher.start()        # loads the client configuration; raises DiscoveryError
    await watcher.wait_synced()  # optional: until the first list reached pool.set_workers
    ...
    await watcher.aclose()       # ends the watch thread

A thread lists the pods that match the label selector, then watches them (core/v1 Pods, served by
every Kubernetes from 1.20 on) from the list's resourceVersion, and keeps pod name -> "HOST:PORT"
for the pods that may get traffic (see `pod_address`). Whenever that set of addresses changes, the
router's event loop hands the whole set to the sink; calls never overlap and a burst of changes
may reach the sink as one call. An expired watch (410 Gone) is answered by a relist; any other
failure (API server down or restarting, a broken connection, a refused request) by a relist after
a capped exponential backoff, logged once per outage. While the API server cannot be reached the
sink keeps the last set it got: pods that were serving most likely still are.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import urllib3
from kubernetes import client, config, watch

log = logging.getLogger(__name__)

GRPC_PORT_NAME = "grpc"  # the worker container's gRPC port, as the chart names it
DEFAULT_WORKER_PORT = 50061  # the chart's default expertWorkers.ports.grpc
HTTP_GONE = 410
_MIN_WATCH_S = 1.0  # a watch that the API server ends sooner is resumed after a pause
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Failures of talking to the API server; anything else is logged with its traceback.
_EXPECTED_ERRORS = (client.ApiException, urllib3.exceptions.HTTPError, OSError)


class DiscoveryError(RuntimeError):
    """Discovery cannot start: no in-cluster configuration, or an unreadable kubeconfig."""


class WorkerSink(Protocol):
    async def set_workers(self, addresses: frozenset[str]) -> None:
        """The full set of worker addresses ("HOST:PORT") that are Ready now. Called on the
        router's event loop whenever that set changes (and once after the first list)."""


@dataclass(frozen=True)
class KubernetesDiscoveryConfig:
    """Where the worker pods are and how patiently to talk to the API server."""

    namespace: str
    selector: str  # label selector, e.g. "app.kubernetes.io/component=expert-worker,..."
    port: int = DEFAULT_WORKER_PORT  # for pods whose containers name no port "grpc"
    kubeconfig: Path | None = None  # None: the pod's in-cluster service account
    watch_timeout_s: int = 300  # the API server ends each watch after this; it is resumed
    connect_timeout_s: float = 5.0  # TCP + TLS connect to the API server
    list_timeout_s: float = 30.0  # reading a list response
    backoff_initial_s: float = 0.5  # first wait after a failure; doubles up to backoff_max_s
    backoff_max_s: float = 30.0
    stop_timeout_s: float = 5.0  # how long aclose() waits for the watch thread

    def __post_init__(self) -> None:
        if len(self.namespace) > 63 or not _NAMESPACE.fullmatch(self.namespace):
            raise ValueError(
                f"namespace must be a DNS label (lower-case letters, digits and '-', at most 63 "
                f"characters), got {self.namespace!r}"
            )
        if not self.selector.strip():
            raise ValueError("the label selector of the worker pods may not be empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"worker port must be in 1-65535, got {self.port}")
        if self.kubeconfig is not None:
            object.__setattr__(self, "kubeconfig", Path(self.kubeconfig))
        if not (isinstance(self.watch_timeout_s, int) and self.watch_timeout_s >= 1):
            raise ValueError(
                f"watch_timeout_s must be a whole number >= 1, got {self.watch_timeout_s}"
            )
        for name in ("connect_timeout_s", "list_timeout_s", "backoff_initial_s", "stop_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s "
                f"({self.backoff_initial_s})"
            )


def load_api_client(kubeconfig: Path | None) -> client.ApiClient:
    """A private ApiClient from a kubeconfig file, or in-cluster when `kubeconfig` is None.

    The global default configuration of the kubernetes package is left alone.
    """
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as err:
            raise DiscoveryError(
                f"no in-cluster Kubernetes configuration ({err}): run the router in a pod with a "
                "service account, or pass --kubeconfig"
            ) from err
    else:
        if not Path(kubeconfig).is_file():
            raise DiscoveryError(f"kubeconfig {kubeconfig} does not exist")
        try:
            config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        except Exception as err:  # ConfigException, and YAML or key errors of a malformed file
            raise DiscoveryError(f"cannot use the kubeconfig {kubeconfig}: {err}") from err
    return client.ApiClient(configuration)


def pod_address(pod: dict, default_port: int) -> str | None:
    """'HOST:PORT' of a pod that may get traffic, else None. `pod` is the API's JSON object.

    A pod gets traffic when it is Running, has a pod IP, its Ready condition is True and it is not
    being deleted (a deletion first arrives as a change that sets metadata.deletionTimestamp).
    PORT is the containerPort named "grpc" in the pod's spec, else `default_port`; IPv6 hosts get
    brackets.
    """
    metadata = pod.get("metadata") or {}
    status = pod.get("status") or {}
    ip = status.get("podIP")
    if metadata.get("deletionTimestamp") or status.get("phase") != "Running" or not ip:
        return None
    conditions = status.get("conditions") or ()
    if not any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions):
        return None
    port = default_port
    for container in (pod.get("spec") or {}).get("containers") or ():
        named = [p for p in container.get("ports") or () if p.get("name") == GRPC_PORT_NAME]
        if named:
            port = int(named[0]["containerPort"])
            break
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): only a relist can go on."""


class PodWatcher:
    """Follows the Ready worker pods and hands their addresses to a `WorkerSink`.

    Not reusable: start() once, aclose() once (aclose is idempotent).
    """

    def __init__(self, config: KubernetesDiscoveryConfig, sink: WorkerSink) -> None:
        self.config = config
        self._sink = sink
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api: client.ApiClient | None = None
        self._core: client.CoreV1Api | None = None
        self._thread: threading.Thread | None = None
        self._deliverer: asyncio.Task | None = None
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None  # the running watch, for aclose() to interrupt
        # Watch thread only: pod name -> address of the pods that get traffic.
        self._pods: dict[str, str] = {}
        self._published: frozenset[str] | None = None
        self._outage_since: float | None = None
        # Event loop only: the newest set and whether the sink has it.
        self._latest: frozenset[str] = frozenset()
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()

    @property
    def addresses(self) -> frozenset[str]:
        """The newest set of addresses that reached the event loop (not necessarily the sink)."""
        return self._latest

    async def start(self) -> None:
        """Load the client configuration, then start watching; raises DiscoveryError."""
        if self._thread is not None:
            raise RuntimeError("PodWatcher.start() may be called once")
        self._loop = asyncio.get_running_loop()
        self._api = load_api_client(self.config.kubeconfig)
        self._core = client.CoreV1Api(self._api)
        self._deliverer = asyncio.create_task(self._deliver(), name="pod-discovery-sink")
        self._thread = threading.Thread(
            target=self._run, name=f"pod-watch-{self.config.namespace}", daemon=True
        )
        self._thread.start()
        log.info(
            "discovering expert workers: pods in namespace %s with labels %s, via %s",
            self.config.namespace,
            self.config.selector,
            self._api.configuration.host,
        )

    async def wait_synced(self) -> None:
        """Returns once the sink got the set of the first successful list."""
        await self._synced.wait()

    async def aclose(self) -> None:
        """Stop watching: ends the thread (at most stop_timeout_s) and the delivery task."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + self.config.stop_timeout_s
        while self._thread.is_alive() and time.monotonic() < deadline:
            # Repeated: a watch that started after the previous call is interrupted too.
            current = self._watch
            if current is not None:
                current.stop()  # shuts the socket down, which unblocks the thread's read
            await asyncio.sleep(0.02)
        if self._thread.is_alive():
            log.warning(
                "the pod watch thread did not end within %.1f s; leaving it (a daemon thread)",
                self.config.stop_timeout_s,
            )
        else:
            self._api.close()
        self._deliverer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._deliverer

    async def __aenter__(self) -> PodWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

    # --- event loop side --------------------------------------------------------------------

    def _offer(self, addresses: frozenset[str]) -> None:
        self._latest = addresses
        self._changed.set()

    async def _deliver(self) -> None:
        """Hands each new set to the sink, one call at a time, newest set first."""
        delivered: frozenset[str] | None = None
        while True:
            await self._changed.wait()
            self._changed.clear()
            addresses = self._latest
            if addresses == delivered:
                continue
            try:
                await self._sink.set_workers(addresses)
            except Exception:
                # The next change delivers the full set again.
                log.exception("the worker pool failed to take %d worker addresses", len(addresses))
                continue
            delivered = addresses
            self._synced.set()

    # --- watch thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.config.backoff_initial_s
        resource_version: str | None = None  # None: relist before watching
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                started = time.monotonic()
                resource_version = self._watch_from(resource_version)
                backoff = self.config.backoff_initial_s
                if time.monotonic() - started < _MIN_WATCH_S:  # ended at once: do not spin
                    self._stopping.wait(backoff)
            except _Expired:
                log.info("the pod watch expired (410 Gone); relisting")
                resource_version = None
            except Exception as err:
                if self._stopping.is_set():
                    break
                self._failed(err, backoff)
                resource_version = None
                self._stopping.wait(backoff * random.uniform(0.8, 1.2))
                backoff = min(2 * backoff, self.config.backoff_max_s)

    def _relist(self) -> str:
        """Lists the matching pods, replaces the state with them; returns the resourceVersion."""
        response = self._core.list_namespaced_pod(
            self.config.namespace,
            label_selector=self.config.selector,
            _preload_content=False,
            _request_timeout=(self.config.connect_timeout_s, self.config.list_timeout_s),
        )
        try:
            listed = json.loads(response.data)
        finally:
            response.release_conn()
        pods = {}
        for pod in listed.get("items") or ():
            address = pod_address(pod, self.config.port)
            if address is not None:
                pods[pod["metadata"]["name"]] = address
        self._pods = pods
        if self._outage_since is not None:
            log.info(
                "the Kubernetes API server answers again after %.1f s; %d worker pods are Ready",
                time.monotonic() - self._outage_since,
                len(pods),
            )
            self._outage_since = None
        self._publish()
        return listed["metadata"]["resourceVersion"]

    def _watch_from(self, resource_version: str) -> str:
        """Applies watch events until the API server ends the watch; returns the newest
        resourceVersion seen. Raises _Expired on 410 Gone, anything else on other failures."""
        stream = watch.Watch()
        self._watch = stream
        if self._stopping.is_set():  # aclose() may have missed this watch
            return resource_version
        try:
            for event in stream.stream(
                self._core.list_namespaced_pod,
                self.config.namespace,
                label_selector=self.config.selector,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=self.config.watch_timeout_s,
                # The read timeout outlasts the server's own end of the watch, and notices a
                # connection that died without a word.
                _request_timeout=(self.config.connect_timeout_s, self.config.watch_timeout_s + 30),
            ):
                if self._stopping.is_set():
                    break
                pod = event["raw_object"]
                resource_version = pod["metadata"].get("resourceVersion") or resource_version
                if event["type"] == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                address = None if event["type"] == "DELETED" else pod_address(pod, self.config.port)
                if address is None:
                    self._pods.pop(name, None)
                else:
                    self._pods[name] = address
                self._publish()
        except client.ApiException as err:
            if err.status == HTTP_GONE:
                raise _Expired from err
            raise
        finally:
            self._watch = None
            stream.stop()
        return resource_version

    def _publish(self) -> None:
        addresses = frozenset(self._pods.values())
        if addresses == self._published:
            return
        self._published = addresses
        log.info("Ready worker pods: %s", ", ".join(sorted(addresses)) or "none")
        try:
            self._loop.call_soon_threadsafe(self._offer, addresses)
        except RuntimeError:  # the event loop is closed: the router is gone
            self._stopping.set()

    def _failed(self, err: Exception, backoff: float) -> None:
        """Logs the first failure of an outage as a warning, later ones at debug level."""
        if isinstance(err, client.ApiException):
            reason = f"{err.status} {err.reason}".strip()
        else:
            reason = f"{type(err).__name__}: {err}"
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "cannot list or watch pods in namespace %s at %s (%s); keeping the %d known "
                "workers and retrying every %.1f-%.0f s",
                self.config.namespace,
                self._api.configuration.host,
                reason,
                len(self._pods),
                backoff,
                self.config.backoff_max_s,
                exc_info=not isinstance(err, _EXPECTED_ERRORS),
            )
        else:
            log.debug("pod discovery still failing: %s", reason)
