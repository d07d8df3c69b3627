"""A whole cluster on this machine: N expert worker processes and one router process.

    with LocalCluster(model_dir, workers=2, precision="fp32", device="cpu") as cluster:
        Client(cluster.address).generate(...)

`workers` shards of the experts, each served by `replicas` processes (worker i serves shard
i mod workers). The router runs on `device`; worker i on `worker_devices[i mod len]` (e.g.
cuda:1..cuda:7 with the router on cuda:0), or on `device` too. `kill_worker` and
`restart_worker` (same port) let tests play failures.
`add_router` starts one more router on the same workers (e.g. with other options).

Each process picks a free loopback port (`--port 0 --port-file`), and with `metrics=True` (the
default) a free port for its Prometheus `/metrics` (`--metrics-port 0 --metrics-port-file`); the
launcher waits for the port files and for health SERVING, and stops every process it started on
exit (SIGTERM, then SIGKILL after a grace period). If a process dies while starting, the error
names it and shows the end of its log.

Plaintext by default (every process gets --insecure: the cluster talks over loopback). With
`tls_dir`, every process gets --tls-cert DIR/tls.crt --tls-key DIR/tls.key --tls-ca DIR/ca.crt
(the certificate must name the host, e.g. 127.0.0.1, and allow server and client use); with
`auth_token_file`, every process gets --auth-token-file and clients must send the token.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

_PROJECT_ROOT = Path(__file__).resolve().parents[1]  # lets children import the packages
_POLL_S = 0.1
_LOG_TAIL_LINES = 30


class ClusterStartError(RuntimeError):
    """A process of the cluster exited or did not become healthy while starting."""


@dataclass
class ManagedProcess:
    name: str  # "worker-0", "router"
    popen: subprocess.Popen
    log_path: Path
    port_file: Path
    module_args: tuple[str, ...] = ()
    address: str = ""  # host:port once serving
    metrics_port_file: Path | None = None  # None: started without a metrics endpoint
    metrics_address: str = ""  # host:port of /metrics once serving (with metrics)

    @property
    def metrics_url(self) -> str:
        """http://host:port/metrics, or "" for a process without metrics."""
        return f"http://{self.metrics_address}/metrics" if self.metrics_address else ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open(errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except OSError:
            return ""


class LocalCluster:
    """Starts the cluster in `start()` (or `with`), stops it in `stop()` (or at the block's end)."""

    def __init__(
        self,
        model_dir: str | Path,
        workers: int = 2,
        replicas: int = 1,
        precision: str = "fp32",
        device: str = "cpu",
        worker_devices: tuple[str, ...] = (),  # worker i on worker_devices[i % len]; () = device
        host: str = "127.0.0.1",
        port: int = 0,
        router_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        threads_per_process: int | None = None,  # None: share the CPU cores when on cpu
        start_timeout_s: float = 180.0,
        stop_grace_s: float = 10.0,
        log_dir: str | Path | None = None,
        tls_dir: str | Path | None = None,
        auth_token_file: str | Path | None = None,
        metrics: bool = True,  # every process serves /metrics on a free port of host
    ) -> None:
        if workers < 1:
            raise ValueError(f"a cluster needs at least one worker, got {workers}")
        if replicas < 1:
            raise ValueError(f"every shard needs at least one replica, got {replicas}")
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model folder {model_dir} does not exist")
        self.model_dir = Path(model_dir)
        self.num_shards = workers
        self.num_workers = workers * replicas
        self.precision = precision
        self.device = device
        self.worker_devices = tuple(worker_devices)
        self.host = host
        self.port = port
        self.router_args = tuple(router_args)
        self.worker_args = tuple(worker_args)
        self.threads_per_process = threads_per_process
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.tls_dir = Path(tls_dir) if tls_dir is not None else None
        self.auth_token_file = Path(auth_token_file) if auth_token_file is not None else None
        self.metrics = metrics
        self.workers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None
        self.extra_routers: list[ManagedProcess] = []  # from add_router

    @property
    def address(self) -> str:
        """host:port of the router."""
        if self.router is None or not self.router.address:
            raise RuntimeError("the cluster is not running")
        return self.router.address

    @property
    def processes(self) -> list[ManagedProcess]:
        return [*([self.router] if self.router else []), *self.extra_routers, *self.workers]

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        if self.processes:
            raise RuntimeError("the cluster is already started")
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="moe-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            deadline = time.monotonic() + self.start_timeout_s
            for i in range(self.num_workers):
                self.workers.append(self._spawn(f"worker-{i}", self._worker_args(i)))
            for worker in self.workers:
                self._wait_serving(worker, deadline)
            self.router = self._spawn("router", self._router_args())
            self._wait_serving(self.router, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stops the router, then the workers: SIGTERM, then SIGKILL after the grace period."""
        atexit.unregister(self.stop)
        routers = [*([self.router] if self.router else []), *self.extra_routers]
        for group in (routers, self.workers):
            alive = [p for p in group if p.popen.poll() is None]
            for proc in alive:
                proc.popen.send_signal(signal.SIGTERM)
            grace = self.stop_grace_s
            deadline = time.monotonic() + grace
            for proc in alive:
                try:
                    proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("%s still runs after %.0f s: killing it", proc.name, grace)
                    proc.popen.kill()
                    proc.popen.wait()
        self.router, self.extra_routers, self.workers = None, [], []
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def add_router(self, name: str, extra_args: tuple[str, ...] = ()) -> ManagedProcess:
        """Starts another router on this cluster's workers, with the cluster's router options
        plus extra_args (e.g. `--profile-steps`), and waits until it serves; `stop` stops it."""
        if self.router is None:
            raise RuntimeError("the cluster is not running")
        proc = self._spawn(name, [*self._router_args(), *extra_args])
        self.extra_routers.append(proc)
        self._wait_serving(proc, time.monotonic() + self.start_timeout_s)
        return proc

    def kill_worker(self, index: int) -> None:
        """SIGKILL: the worker dies at once, as on a node failure."""
        proc = self.workers[index]
        proc.popen.kill()
        proc.popen.wait()

    def restart_worker(self, index: int, timeout_s: float | None = None) -> None:
        """Starts a stopped worker again on its old port and waits until it serves."""
        old = self.workers[index]
        if old.popen.poll() is None:
            raise RuntimeError(f"{old.name} is still running")
        port = old.address.rpartition(":")[2]
        args = [*old.module_args]
        args[args.index("--port") + 1] = port
        old.port_file.unlink(missing_ok=True)
        proc = self._spawn(old.name, args)
        self.workers[index] = proc
        self._wait_serving(proc, time.monotonic() + (timeout_s or self.start_timeout_s))

    def _security_args(self) -> list[str]:
        """TLS files (or --insecure) and the token file, the same for every process."""
        args = ["--insecure"]
        if self.tls_dir is not None:
            args = ["--tls-cert", str(self.tls_dir / "tls.crt"), "--tls-key"]
            args += [str(self.tls_dir / "tls.key"), "--tls-ca", str(self.tls_dir / "ca.crt")]
        if self.auth_token_file is not None:
            args += ["--auth-token-file", str(self.auth_token_file)]
        return args

    def _health_channel(self, address: str) -> grpc.Channel:
        """A channel that passes the servers' TLS checks (health needs no token)."""
        if self.tls_dir is None:
            return grpc.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            *((self.tls_dir / name).read_bytes() for name in ("ca.crt", "tls.key", "tls.crt"))
        )
        return grpc.secure_channel(address, credentials)

    def _worker_args(self, index: int) -> list[str]:
        return [
            "expert_worker",
            "serve",
            "--model",
            str(self.model_dir),
            "--shard",
            f"{index % self.num_shards}/{self.num_shards}",
            "--host",
            self.host,
            "--port",
            "0",
            "--device",
            self.worker_devices[index % len(self.worker_devices)]
            if self.worker_devices
            else self.device,
            "--precision",
            self.precision,
            *self._security_args(),
            *self.worker_args,
        ]

    def _router_args(self) -> list[str]:
        return [
            "router",
            "serve",
            "--model",
            str(self.model_dir),
            "--workers",
            ",".join(w.address for w in self.workers),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--device",
            self.device,
            "--precision",
            self.precision,
            *self._security_args(),
            *self.router_args,
        ]

    def _spawn(self, name: str, module_args: list[str]) -> ManagedProcess:
        assert self.log_dir is not None
        port_file = self.log_dir / f"{name}.port"
        log_path = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        threads = self.threads_per_process
        if threads is None and self.device == "cpu":
            # processes that share the cores: oversubscribed OpenMP threads spin and crawl
            threads = max(1, (os.cpu_count() or 1) // (self.num_workers + 1))
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", *module_args, "--port-file", str(port_file)]
        metrics_port_file = None
        if self.metrics:
            metrics_port_file = self.log_dir / f"{name}.metrics-port"
            command += ["--metrics-port", "0", "--metrics-port-file", str(metrics_port_file)]
        for stale in (port_file, metrics_port_file):  # left by an earlier run in this log_dir
            if stale is not None:
                stale.unlink(missing_ok=True)
        with log_path.open("ab") as log_file:  # a restarted worker appends
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
            )
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return ManagedProcess(
            name,
            popen,
            log_path,
            port_file,
            tuple(module_args),
            metrics_port_file=metrics_port_file,
        )

    def _wait_serving(self, proc: ManagedProcess, deadline: float) -> None:
        """Waits for proc's port files, then for its health service to answer SERVING."""
        proc.address = self._wait_port(proc, proc.port_file, deadline)
        if proc.metrics_port_file is not None:
            proc.metrics_address = self._wait_port(proc, proc.metrics_port_file, deadline)
        with self._health_channel(proc.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive(proc, deadline)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(_POLL_S)
        log.info("%s serving on %s", proc.name, proc.address)

    def _wait_port(self, proc: ManagedProcess, port_file: Path, deadline: float) -> str:
        """Waits for proc to write port_file -> host:port."""
        while not port_file.is_file():
            self._check_alive(proc, deadline)
            time.sleep(_POLL_S)
        port = int(port_file.read_text().strip())
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    def _check_alive(self, proc: ManagedProcess, deadline: float) -> None:
        code = proc.popen.poll()
        if code is not None:
            raise ClusterStartError(
                f"{proc.name} exited with status {code} while starting; "
                f"last lines of its log:\n{proc.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise ClusterStartError(
                f"{proc.name} was not serving after {self.start_timeout_s:.0f} s; "
                f"last lines of its log:\n{proc.log_tail()}"
            )
