"""A real etcd + kube-apiserver on 127.0.0.1 for integration tests.

    from .apiserver import kube_apiserver  # a session fixture; or in a conftest.py

    def test_something(kube_apiserver):
        api = kube_apiserver.core_v1()              # kubernetes.client.CoreV1Api, admin token
        kube_apiserver.url, kube_apiserver.token, kube_apiserver.ca_file, kube_apiserver.kubeconfig

    def test_restarts(own_kube_apiserver):          # a server of the test's own (function scope)
        server = own_kube_apiserver()               # LocalApiServer; extra flags as arguments
        server.info.core_v1(); server.restart_apiserver()  # same port, certificate, token, etcd

The binary comes from scripts/build-kube-apiserver.sh (Kubernetes 1.20, built from Debian's source
package): $MOE_KUBE_APISERVER, else the newest one in its cache, else `kube-apiserver` on PATH.
etcd is $MOE_ETCD or `etcd` on PATH; service-account keys are made with openssl. When something
is missing the tests are skipped with the reason, unless MOE_REQUIRE_APISERVER=1 (CI), which turns
the skip into a failure.

The server has no scheduler, controller-manager or kubelet: a test plays the kubelet by patching a
pod's status. No namespace exists at start, and the ServiceAccount admission plugin is off because
no controller creates the "default" accounts it insists on. Only loopback addresses are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
PR_SET_PDEATHSIG = 1


class ApiServerUnavailable(RuntimeError):
    """A binary or tool the server needs is missing, or it did not become ready."""


@dataclass(frozen=True)
class ApiServer:
    """Connection details of a running server; every address is loopback."""

    url: str  # https://127.0.0.1:PORT
    token: str  # bearer token of a system:masters user
    ca_file: Path  # verifies the server's self-signed serving certificate
    kubeconfig: Path  # the same, as a kubeconfig file (context "moe-test")
    etcd_url: str

    def client_configuration(self, token: str | None = None):
        """A kubernetes.client.Configuration for this server, as admin or with `token`."""
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        config.api_key = {"authorization": f"Bearer {token or self.token}"}
        config.ssl_ca_cert = str(self.ca_file)
        config.verify_ssl = True
        return config

    def api_client(self, token: str | None = None):
        from kubernetes import client

        return client.ApiClient(self.client_configuration(token))

    def core_v1(self, token: str | None = None):
        from kubernetes import client

        return client.CoreV1Api(self.api_client(token))


def _require(condition: bool, reason: str) -> None:
    """Skip the test for a missing tool, or fail it where CI demands the real server."""
    if condition:
        return
    if os.environ.get("MOE_REQUIRE_APISERVER") == "1":
        pytest.fail(f"MOE_REQUIRE_APISERVER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in path.parent.name.split("."))


def find_apiserver() -> Path | None:
    if os.environ.get("MOE_KUBE_APISERVER"):
        return Path(os.environ["MOE_KUBE_APISERVER"])
    cache = Path(os.environ.get("MOE_K8S_CACHE", Path.home() / ".cache" / "moe-cluster" / "k8s"))
    cached = sorted(cache.glob("*/kube-apiserver"), key=_version_key)
    if cached:
        return cached[-1]
    found = shutil.which("kube-apiserver")
    return Path(found) if found else None


def find_etcd() -> Path | None:
    found = os.environ.get("MOE_ETCD") or shutil.which("etcd")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _service_account_keys(directory: Path) -> tuple[Path, Path]:
    """An RSA key pair signing and verifying service-account tokens."""
    key, pub = directory / "sa.key", directory / "sa.pub"
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ApiServerUnavailable("openssl is not installed (apt-get install openssl)")
    for argv in (
        [openssl, "genrsa", "-out", str(key), "2048"],
        [openssl, "rsa", "-in", str(key), "-pubout", "-out", str(pub)],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return key, pub


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _get(port: int, path: str, context: ssl.SSLContext | None, token: str | None) -> int:
    """Status of GET http(s)://127.0.0.1:PORT/PATH; proxies in the environment are not used."""
    if context is None:
        conn: http.client.HTTPConnection = http.client.HTTPConnection(HOST, port, timeout=5)
    else:
        conn = http.client.HTTPSConnection(HOST, port, timeout=5, context=context)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        return conn.getresponse().status
    finally:
        conn.close()


def _wait_ready(
    name: str,
    process: subprocess.Popen,
    log: Path,
    port: int,
    path: str,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ApiServerUnavailable(
                f"{name} exited with status {process.returncode}:\n{_tail(log)}"
            )
        with contextlib.suppress(OSError, http.client.HTTPException):
            if _get(port, path, context, token) == 200:
                return
        time.sleep(0.1)
    raise ApiServerUnavailable(f"{name} not ready after {READY_TIMEOUT_S:.0f} s:\n{_tail(log)}")


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when the test process dies, even by SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _write_kubeconfig(path: Path, url: str, ca_file: Path, token: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "moe-test", "cluster": {"server": url, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "moe-test", "context": {"cluster": "moe-test", "user": "admin"}}],
        "current-context": "moe-test",
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML: any kubeconfig reader takes it


class LocalApiServer:
    """etcd and kube-apiserver processes under `workdir`, all on 127.0.0.1.

    `start()` brings both up; `stop_apiserver()` / `start_apiserver()` / `restart_apiserver()`
    stop and start kube-apiserver alone, keeping etcd's data, the port, the serving certificate
    and the admin token, so clients and kubeconfigs made before a restart work after it.
    `extra_args` are added to kube-apiserver's command line (e.g. "--watch-cache=false").
    """

    def __init__(
        self, workdir: Path, apiserver: Path, etcd: Path, extra_args: tuple[str, ...] = ()
    ) -> None:
        self.workdir = workdir
        self._apiserver, self._etcd, self._extra_args = apiserver, etcd, tuple(extra_args)
        self._etcd_proc: subprocess.Popen | None = None
        self._api_proc: subprocess.Popen | None = None
        self._api_port = 0
        self._token = ""
        self._etcd_url = ""
        self.info: ApiServer | None = None  # set once start() returns

    def start(self) -> ApiServer:
        """Start etcd, then kube-apiserver; return when /readyz answers."""
        workdir = self.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        etcd_port, peer_port, self._api_port = _free_port(), _free_port(), _free_port()
        self._token = secrets.token_hex(16)
        tokens = workdir / "tokens.csv"
        tokens.write_text(f'{self._token},admin,admin,"system:masters"\n')
        tokens.chmod(0o600)
        _service_account_keys(workdir)
        self._etcd_url = f"http://{HOST}:{etcd_port}"
        etcd_log = workdir / "etcd.log"
        with etcd_log.open("wb") as out:
            self._etcd_proc = subprocess.Popen(
                [
                    str(self._etcd),
                    "--name=moe-test",
                    f"--data-dir={workdir / 'etcd'}",
                    f"--listen-client-urls={self._etcd_url}",
                    f"--advertise-client-urls={self._etcd_url}",
                    f"--listen-peer-urls=http://{HOST}:{peer_port}",
                    f"--initial-advertise-peer-urls=http://{HOST}:{peer_port}",
                    f"--initial-cluster=moe-test=http://{HOST}:{peer_port}",
                    "--logger=zap",
                    "--log-level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        _wait_ready("etcd", self._etcd_proc, etcd_log, etcd_port, "/health")
        ca_file = self.start_apiserver()
        url = f"https://{HOST}:{self._api_port}"
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, url, ca_file, self._token)
        self.info = ApiServer(
            url=url,
            token=self._token,
            ca_file=ca_file,
            kubeconfig=kubeconfig,
            etcd_url=self._etcd_url,
        )
        return self.info

    def start_apiserver(self) -> Path:
        """Start kube-apiserver (again) on its port; return its CA file once /readyz answers."""
        workdir = self.workdir
        cert_dir = workdir / "certs"
        api_log = workdir / "kube-apiserver.log"
        with api_log.open("ab") as out:
            self._api_proc = subprocess.Popen(
                [
                    str(self._apiserver),
                    f"--etcd-servers={self._etcd_url}",
                    f"--bind-address={HOST}",
                    f"--advertise-address={HOST}",
                    f"--secure-port={self._api_port}",
                    "--insecure-port=0",
                    f"--cert-dir={cert_dir}",
                    f"--token-auth-file={workdir / 'tokens.csv'}",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={workdir / 'sa.pub'}",
                    f"--service-account-signing-key-file={workdir / 'sa.key'}",
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--endpoint-reconciler-type=none",
                    "--disable-admission-plugins=ServiceAccount",
                    "--profiling=false",
                    "--v=1",
                    *self._extra_args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        # The self-signed serving certificate is written at first start (and kept in --cert-dir
        # for later ones); wait for it, then trust it.
        ca_file = cert_dir / "apiserver.crt"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ca_file.exists() and self._api_proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not ca_file.exists():
            raise ApiServerUnavailable(f"kube-apiserver wrote no certificate:\n{_tail(api_log)}")
        context = ssl.create_default_context(cafile=str(ca_file))
        _wait_ready(
            "kube-apiserver",
            self._api_proc,
            api_log,
            self._api_port,
            "/readyz",
            context,
            self._token,
        )
        return ca_file

    def stop_apiserver(self, crash: bool = False) -> None:
        """Stop kube-apiserver; etcd keeps running with all the data.

        crash=False: SIGTERM, then SIGKILL after 10 s (a graceful stop waits for open watches to
        end); crash=True: SIGKILL at once, as a crash or an OOM kill would.
        """
        if crash and self._api_proc is not None and self._api_proc.poll() is None:
            self._api_proc.kill()
            self._api_proc.wait(timeout=10)
        _stop(self._api_proc)
        self._api_proc = None

    def restart_apiserver(self, crash: bool = False) -> None:
        self.stop_apiserver(crash)
        self.start_apiserver()

    def close(self) -> None:
        _stop(self._api_proc)
        _stop(self._etcd_proc)
        self._api_proc = self._etcd_proc = None


@contextlib.contextmanager
def running_apiserver(
    workdir: Path, apiserver: Path, etcd: Path, extra_args: tuple[str, ...] = ()
) -> Iterator[LocalApiServer]:
    """Start etcd and kube-apiserver under `workdir`, yield when /readyz answers, always stop."""
    server = LocalApiServer(workdir, apiserver, etcd, extra_args)
    try:
        server.start()
        yield server
    finally:
        server.close()


def _tools() -> tuple[Path, Path]:
    """The kube-apiserver and etcd binaries; skips (or fails, in CI) when something is missing."""
    apiserver, etcd = find_apiserver(), find_etcd()
    _require(
        apiserver is not None and apiserver.is_file() and os.access(apiserver, os.X_OK),
        f"no kube-apiserver binary ({apiserver or 'none found'}); "
        "build one with `bash scripts/build-kube-apiserver.sh`",
    )
    _require(etcd is not None, "etcd is not installed (apt-get install etcd-server)")
    _require(shutil.which("openssl") is not None, "openssl is not installed")
    _require(
        importlib.util.find_spec("kubernetes") is not None,
        "the kubernetes Python client is not installed (pip install the test extras)",
    )
    return apiserver, etcd


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory) -> Iterator[ApiServer]:
    """One etcd + kube-apiserver for the session; tests isolate themselves by namespace."""
    apiserver, etcd = _tools()
    try:
        with running_apiserver(tmp_path_factory.mktemp("kube-apiserver"), apiserver, etcd) as api:
            yield api.info
    except ApiServerUnavailable as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture
def own_kube_apiserver(tmp_path_factory) -> Iterator[Callable[..., LocalApiServer]]:
    """A factory of servers that belong to one test, which may restart them or pass flags:

    server = own_kube_apiserver("--watch-cache=false")  # a started LocalApiServer
    """
    apiserver, etcd = _tools()
    servers: list[LocalApiServer] = []

    def start(*extra_args: str) -> LocalApiServer:
        server = LocalApiServer(
            tmp_path_factory.mktemp("own-kube-apiserver"), apiserver, etcd, extra_args
        )
        servers.append(server)
        try:
            server.start()
        except ApiServerUnavailable as err:
            pytest.fail(str(err), pytrace=False)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.close()
