"""A whole cluster on this machine: N expert worker processes and one router process.

    with LocalCluster(model_dir, workers=2, precision="fp32", device="cpu") as cluster:
        Client(cluster.address).generate(...)

Each process picks a free loopback port (`--port 0 --port-file`); the launcher waits for the port
files and for health SERVING, and stops every process it started on exit (SIGTERM, then SIGKILL
after a grace period). If a process dies while starting, the error names it and shows the end of
its log.
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
    address: str = ""  # host:port once serving

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
        precision: str = "fp32",
        device: str = "cpu",
        host: str = "127.0.0.1",
        port: int = 0,
        router_args: tuple[str, ...] = (),
        threads_per_process: int | None = None,  # None: share the CPU cores when on cpu
        start_timeout_s: float = 180.0,
        stop_grace_s: float = 10.0,
        log_dir: str | Path | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"a cluster needs at least one worker, got {workers}")
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"model folder {model_dir} does not exist")
        self.model_dir = Path(model_dir)
        self.num_workers = workers
        self.precision = precision
        self.device = device
        self.host = host
        self.port = port
        self.router_args = tuple(router_args)
        self.threads_per_process = threads_per_process
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.workers: list[ManagedProcess] = []
        self.router: ManagedProcess | None = None

    @property
    def address(self) -> str:
        """host:port of the router."""
        if self.router is None or not self.router.address:
            raise RuntimeError("the cluster is not running")
        return self.router.address

    @property
    def processes(self) -> list[ManagedProcess]:
        return [*([self.router] if self.router else []), *self.workers]

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
        for group in ([self.router] if self.router else [], self.workers):
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
        self.router, self.workers = None, []
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
            self.log_dir = None

    def _worker_args(self, index: int) -> list[str]:
        return [
            "expert_worker",
            "serve",
            "--model",
            str(self.model_dir),
            "--shard",
            f"{index}/{self.num_workers}",
            "--host",
            self.host,
            "--port",
            "0",
            "--device",
            self.device,
            "--precision",
            self.precision,
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
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops them in order
            )
        log.info("started %s (pid %d), log %s", name, popen.pid, log_path)
        return ManagedProcess(name, popen, log_path, port_file)

    def _wait_serving(self, proc: ManagedProcess, deadline: float) -> None:
        """Waits for proc's port file, then for its health service to answer SERVING."""
        while not proc.port_file.is_file():
            self._check_alive(proc, deadline)
            time.sleep(_POLL_S)
        port = int(proc.port_file.read_text().strip())
        proc.address = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        with grpc.insecure_channel(proc.address) as channel:
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
