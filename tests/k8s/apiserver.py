"""A real etcd + kube-apiserver on 127.0.0.1 for integration tests.

    from .apiserver import kube_apiserver  # a session fixture; or in a conftest.py

    def test_something(kube_apiserver):
        api = kube_apiserver.core_v1()              # kubernetes.client.CoreV1Api, admin token
        kube_apiserver.url, kube_apiserver.token, kube_apiserver.ca_file, kube_apiserver.kubeconfig

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
from collections.abc import Iterator
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


@contextlib.contextmanager
def running_apiserver(workdir: Path, apiserver: Path, etcd: Path) -> Iterator[ApiServer]:
    """Start etcd and kube-apiserver under `workdir`, yield when /readyz answers, always stop."""
    workdir.mkdir(parents=True, exist_ok=True)
    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    token = secrets.token_hex(16)
    tokens = workdir / "tokens.csv"
    tokens.write_text(f'{token},admin,admin,"system:masters"\n')
    tokens.chmod(0o600)
    sa_key, sa_pub = _service_account_keys(workdir)
    cert_dir = workdir / "certs"
    etcd_url = f"http://{HOST}:{etcd_port}"
    etcd_log, api_log = workdir / "etcd.log", workdir / "kube-apiserver.log"
    etcd_proc = api_proc = None
    try:
        with etcd_log.open("wb") as out:
            etcd_proc = subprocess.Popen(
                [
                    str(etcd),
                    "--name=moe-test",
                    f"--data-dir={workdir / 'etcd'}",
                    f"--listen-client-urls={etcd_url}",
                    f"--advertise-client-urls={etcd_url}",
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
        _wait_ready("etcd", etcd_proc, etcd_log, etcd_port, "/health")

        with api_log.open("wb") as out:
            api_proc = subprocess.Popen(
                [
                    str(apiserver),
                    f"--etcd-servers={etcd_url}",
                    f"--bind-address={HOST}",
                    f"--advertise-address={HOST}",
                    f"--secure-port={api_port}",
                    "--insecure-port=0",
                    f"--cert-dir={cert_dir}",
                    f"--token-auth-file={tokens}",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={sa_pub}",
                    f"--service-account-signing-key-file={sa_key}",
                    "--service-cluster-ip-range=10.96.0.0/16",
                    "--endpoint-reconciler-type=none",
                    "--disable-admission-plugins=ServiceAccount",
                    "--profiling=false",
                    "--v=1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        # The self-signed serving certificate is written at start; wait for it, then trust it.
        ca_file = cert_dir / "apiserver.crt"
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ca_file.exists() and api_proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not ca_file.exists():
            raise ApiServerUnavailable(f"kube-apiserver wrote no certificate:\n{_tail(api_log)}")
        context = ssl.create_default_context(cafile=str(ca_file))
        _wait_ready("kube-apiserver", api_proc, api_log, api_port, "/readyz", context, token)

        url = f"https://{HOST}:{api_port}"
        kubeconfig = workdir / "kubeconfig"
        _write_kubeconfig(kubeconfig, url, ca_file, token)
        yield ApiServer(
            url=url, token=token, ca_file=ca_file, kubeconfig=kubeconfig, etcd_url=etcd_url
        )
    finally:
        _stop(api_proc)
        _stop(etcd_proc)


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory) -> Iterator[ApiServer]:
    """One etcd + kube-apiserver for the session; tests isolate themselves by namespace."""
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
    try:
        with running_apiserver(tmp_path_factory.mktemp("kube-apiserver"), apiserver, etcd) as api:
            yield api
    except ApiServerUnavailable as err:
        pytest.fail(str(err), pytrace=False)
