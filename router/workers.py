"""The expert workers behind the router: membership, health, and who serves each expert.

Workers join from a static list (`start`) or from a membership source such as Kubernetes pod
discovery (`follow`: the source calls `set_workers` with the full set of addresses that should
serve now). A joining worker is asked `GetInfo`; one that serves another
model or precision is refused and logged, one that does not answer yet is probed again. Every
expert may be held by several workers (replicas): `route` picks one healthy replica per expert for
each dispatch, taking turns. A worker whose call fails leaves routing at once (circuit breaker) and
rejoins when a probe's `GetInfo` answers again.

Threads: dispatch calls `route`, `report_failure` and `record_tokens` on the model's thread;
membership and probes run on the router's event loop. One lock guards the routing state.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import torch

from moe_core.grpc_server import GRPC_OPTIONS, format_ids
from moe_core.precision import Precision
from moe_core.security import make_channel
from moe_core.spec import ModelSpec
from protos import expert_pb2, expert_pb2_grpc
from router.metrics import RouterMetrics

log = logging.getLogger(__name__)

# a restarted worker is found within about a second, not after gRPC's default 2-minute backoff
CHANNEL_OPTIONS = [
    *GRPC_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class Forwarders(Protocol):
    """Other processes with channels to the workers (router.forwarders.ForwarderPool)."""

    def forget(self, address: str, grace_s: float) -> None: ...

    def close(self) -> None: ...


class WorkerSetupError(RuntimeError):
    """The workers cannot serve the router's model: unreachable, inconsistent or incomplete."""


def check_worker_info(
    info: expert_pb2.WorkerInfo, address: str, spec: ModelSpec, precision: Precision
) -> list[str]:
    """What makes a worker unfit for the router's model (empty when it fits)."""
    problems = []
    expected = {
        "model_type": spec.model_type,
        "hidden_size": spec.hidden_size,
        "num_experts": spec.num_experts,
        "precision": Precision(precision).value,
        "moe_layers": list(spec.moe_layers),
    }
    for name, want in expected.items():
        got = getattr(info, name)
        got = list(got) if name == "moe_layers" else got
        if got != want:
            problems.append(f"{address} has {name} {got!r}, the router {want!r}")
    for expert in info.expert_ids:
        if expert >= spec.num_experts:
            problems.append(f"{address} holds expert {expert} of {spec.num_experts}")
    return problems


class MembershipSource(Protocol):
    """Tells a pool which workers exist (e.g. `router.discovery.PodWatcher`)."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...


class WorkerState(enum.Enum):
    PENDING = "pending"  # has not answered GetInfo yet
    HEALTHY = "healthy"  # in routing
    UNHEALTHY = "unhealthy"  # a call failed; probed until it answers again
    UNFIT = "unfit"  # serves another model or precision; never routed to


@dataclass(eq=False)
class Worker:
    address: str
    channel: grpc.aio.Channel
    stub: expert_pb2_grpc.ExpertServiceStub
    expert_ids: tuple[int, ...] = ()  # known once GetInfo answered
    state: WorkerState = WorkerState.PENDING
    failures: int = 0  # failed calls so far
    problem: str = ""  # why it is not healthy, for logs and GetInfo

    @property
    def healthy(self) -> bool:
        return self.state is WorkerState.HEALTHY


@dataclass(frozen=True)
class Route:
    """One dispatch's choice: `workers[owner[e]]` serves expert e; owner[e] = -1: nobody can."""

    workers: tuple[Worker, ...]
    owner: torch.Tensor  # [E] int64

    def missing(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """expert_ids [...] int64 (-1 = empty slot) -> bool mask of the ids nobody serves."""
        return (expert_ids >= 0) & (self.owner[expert_ids.clamp(min=0)] < 0)


@dataclass
class PoolConfig:
    startup_timeout_s: float = 600.0  # `start` waits this long for every expert to be served
    probe_interval_s: float = 0.5  # how often workers out of routing are asked GetInfo
    probe_timeout_s: float = 2.0
    # calls already on their way to a worker that leaves may finish within this before its
    # channel closes (a pod turning NotReady while it drains still answers them)
    leave_grace_s: float = 10.0
    # address -> channel; `moe_core.security.make_channel` with the router's TLS and token
    channel_factory: Callable[[str], grpc.aio.Channel] | None = field(default=None, repr=False)


class WorkerPool:
    def __init__(
        self,
        spec: ModelSpec,
        precision: Precision,
        config: PoolConfig,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.spec = spec
        self.metrics = metrics  # worker health gauges follow the pool
        self.precision = Precision(precision)
        self.config = config
        self._workers: dict[str, Worker] = {}  # by address, in joining order
        self._lock = threading.Lock()
        self._rotations: list[torch.Tensor] = []  # [E] int64 owner per turn, healthy workers only
        self._routed: tuple[Worker, ...] = ()  # the workers the rotations index
        self._turn = 0
        self._tokens = torch.zeros(spec.num_experts, dtype=torch.int64)  # [E] tokens sent
        self._membership: MembershipSource | None = None
        self._probe_task: asyncio.Task | None = None
        self._wake_probe = asyncio.Event()
        self._leaving: set[asyncio.Task] = set()  # channels of workers that left, closing
        self._forwarders: Forwarders | None = None
        self._reachable: dict[str, _Reachability] = {}  # by address: `reachable`'s answers
        self._closed = False

    # -- membership --------------------------------------------------------------------------

    async def start(self, addresses: Iterable[str]) -> None:
        """Static membership: joins every address, then waits up to startup_timeout_s until each
        expert has a healthy worker. Raises WorkerSetupError when a worker does not fit the model
        or experts stay unserved."""
        addresses = list(addresses)
        await self.set_workers(frozenset(addresses), order=addresses)
        deadline = asyncio.get_running_loop().time() + self.config.startup_timeout_s
        pending = [w for w in self._workers.values() if w.state is WorkerState.PENDING]
        await asyncio.gather(*(self._join(w, deadline) for w in pending))
        unfit = [w.problem for w in self._workers.values() if w.state is WorkerState.UNFIT]
        if unfit:
            await self.close()
            raise WorkerSetupError("expert workers do not fit the model: " + "; ".join(unfit))
        missing = self.unserved_experts()
        if missing:
            silent = [w.address for w in self._workers.values() if not w.healthy]
            await self.close()
            raise WorkerSetupError(
                f"no worker serves experts {format_ids(missing)}"
                + (f"; {', '.join(silent)} did not answer GetInfo" if silent else "")
            )

    async def follow(self, source: MembershipSource) -> None:
        """Dynamic membership: starts the source (which calls `set_workers`), then waits up to
        startup_timeout_s until each expert has a healthy worker (WorkerSetupError otherwise).
        The source stops when the pool closes."""
        try:
            await source.start()
        except BaseException:
            await self.close()
            raise
        self._membership = source
        timeout_s = self.config.startup_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.unserved_experts():
            if asyncio.get_running_loop().time() > deadline:
                missing = format_ids(self.unserved_experts())
                unfit = [w.problem for w in self.workers if w.state is WorkerState.UNFIT]
                await self.close()
                raise WorkerSetupError(
                    f"after {timeout_s:.0f} s no worker serves experts {missing}"
                    + (f"; refused workers: {'; '.join(unfit)}" if unfit else "")
                )
            await asyncio.sleep(self.config.probe_interval_s)

    async def set_workers(
        self, addresses: frozenset[str], order: Iterable[str] | None = None
    ) -> None:
        """Makes the pool hold exactly these workers: new ones join (asked GetInfo by the probe
        loop), those not listed any more leave routing at once and their channels close."""
        self._ensure_probe_loop()
        added = [a for a in (order or sorted(addresses)) if a not in self._workers]
        with self._lock:
            gone = [w for a, w in self._workers.items() if a not in addresses]
            for worker in gone:
                del self._workers[worker.address]
                self._reachable.pop(worker.address, None)
            for address in added:
                channel = self._make_channel(address)
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                self._workers[address] = Worker(address, channel, stub)
            self._rebuild()
        for worker in gone:
            log.info("worker %s left", worker.address)
            if self.metrics is not None:
                self.metrics.forget_worker(worker.address)
            if self._forwarders is not None:
                self._forwarders.forget(worker.address, self.config.leave_grace_s)
            closing = asyncio.create_task(worker.channel.close(grace=self.config.leave_grace_s))
            self._leaving.add(closing)
            closing.add_done_callback(self._leaving.discard)
        if added:
            log.info("workers joining: %s", ", ".join(added))
            self._wake_probe.set()

    def attach(self, forwarders: Forwarders) -> None:
        """Processes that also hold channels to the workers: they forget a worker that leaves
        and stop when the pool closes."""
        self._forwarders = forwarders

    def _make_channel(self, address: str) -> grpc.aio.Channel:
        factory = self.config.channel_factory
        if factory is not None:
            return factory(address)
        return make_channel(address, options=CHANNEL_OPTIONS)

    async def _join(self, worker: Worker, deadline: float) -> None:
        """Start-up: waits (until deadline) for the worker's GetInfo, then admits or refuses it."""
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            info = await ask_info(worker, timeout, wait_for_ready=True)
        except WorkerCallError as err:
            worker.problem = f"GetInfo: {err}"
            return
        self._admit(worker, info)

    def _admit(self, worker: Worker, info: expert_pb2.WorkerInfo) -> None:
        problems = check_worker_info(info, worker.address, self.spec, self.precision)
        with self._lock:
            if self._workers.get(worker.address) is not worker:
                return  # it left meanwhile
            if problems:
                worker.state, worker.problem = WorkerState.UNFIT, "; ".join(problems)
                log.error("worker %s refused: %s", worker.address, worker.problem)
            else:
                was = worker.state
                worker.state, worker.problem = WorkerState.HEALTHY, ""
                worker.expert_ids = tuple(info.expert_ids)
                if was is not WorkerState.HEALTHY:  # (start-up and a probe may both answer)
                    log.info(
                        "worker %s %s, experts %s",
                        worker.address,
                        "back in routing" if was is WorkerState.UNHEALTHY else "joined",
                        format_ids(list(worker.expert_ids)),
                    )
            self._rebuild()

    # -- health ------------------------------------------------------------------------------

    def report_failure(self, worker: Worker, code: grpc.StatusCode, details: str) -> None:
        """A call to worker failed: out of routing until a probe succeeds. Any thread."""
        with self._lock:
            worker.failures += 1
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED or not worker.healthy:
                return  # busy, not broken; or already out
            worker.state, worker.problem = WorkerState.UNHEALTHY, f"{code.name}: {details}"
            self._rebuild()
        log.warning("worker %s out of routing: %s: %s", worker.address, code.name, details)
        loop = self._probe_task.get_loop() if self._probe_task is not None else None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake_probe.set)

    def _ensure_probe_loop(self) -> None:
        if self._probe_task is None and not self._closed:
            self._probe_task = asyncio.create_task(self._probe_loop(), name="worker-probes")

    async def _probe_loop(self) -> None:
        while not self._closed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake_probe.wait(), self.config.probe_interval_s)
            self._wake_probe.clear()
            with self._lock:
                out = [w for w in self._workers.values() if w.state in _PROBED]
            await asyncio.gather(*(self._probe(w) for w in out))

    async def _probe(self, worker: Worker) -> None:
        try:
            info = await ask_info(worker, self.config.probe_timeout_s)
        except WorkerCallError:
            return
        self._admit(worker, info)

    # -- routing (model thread) --------------------------------------------------------------

    def _rebuild(self) -> None:
        """Recomputes the rotations from the healthy workers; the lock is held."""
        routed = tuple(w for w in self._workers.values() if w.healthy)
        if self.metrics is not None:
            for worker in self._workers.values():
                self.metrics.set_worker_healthy(worker.address, worker.healthy)
        replicas: list[list[int]] = [[] for _ in range(self.spec.num_experts)]
        for index, worker in enumerate(routed):
            for expert in worker.expert_ids:
                replicas[expert].append(index)
        turns = max((len(r) for r in replicas), default=0) or 1
        self._rotations = [
            torch.tensor([r[turn % len(r)] if r else -1 for r in replicas], dtype=torch.int64)
            for turn in range(turns)
        ]
        self._routed = routed

    def route(self, exclude: frozenset[Worker] = frozenset()) -> Route:
        """Who serves each expert in the next dispatch: replicas take turns; workers in exclude
        (failed during this dispatch) are passed over."""
        with self._lock:
            self._turn += 1
            routed = self._routed
            owner = self._rotations[self._turn % len(self._rotations)]
            if not exclude:
                return Route(routed, owner)
            replicas: list[list[int]] = [[] for _ in range(self.spec.num_experts)]
            for index, worker in enumerate(routed):
                if worker not in exclude:
                    for expert in worker.expert_ids:
                        replicas[expert].append(index)
        owner = [r[self._turn % len(r)] if r else -1 for r in replicas]
        return Route(routed, torch.tensor(owner, dtype=torch.int64))

    def unserved_experts(self) -> list[int]:
        with self._lock:
            owner = self._rotations[0] if self._rotations else None
        if owner is None:
            return list(range(self.spec.num_experts))
        return (owner < 0).nonzero().squeeze(1).tolist()

    # -- accounting and introspection --------------------------------------------------------

    def record_tokens(self, counts: torch.Tensor) -> None:
        """Adds one layer's tokens per expert: counts [E] int64 (a bincount of its top-k ids)."""
        with self._lock:
            self._tokens += counts

    def expert_tokens(self, worker: Worker) -> dict[int, int]:
        """Tokens the router has sent to the experts this worker holds (global id -> count)."""
        with self._lock:
            counts = self._tokens.tolist()
        return {e: counts[e] for e in worker.expert_ids}

    @property
    def workers(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    async def reachable(self, workers: list[Worker], timeout_s: float) -> list[bool]:
        """Whether each worker answers GetInfo, as `probe` says, but shared: an answer younger
        than `probe_interval_s` is reused and a probe in flight is awaited (within timeout_s),
        so that frequent callers (dashboards, clients polling the router's GetInfo) cost the
        workers at most one GetInfo per interval."""
        loop = asyncio.get_running_loop()

        async def one(worker: Worker) -> bool:
            known = self._reachable.get(worker.address)
            max_age_s = self.config.probe_interval_s
            if known is None or known.worker is not worker or known.stale(loop.time(), max_age_s):
                known = _Reachability(worker, answers(worker, self.config.probe_timeout_s), loop)
                self._reachable[worker.address] = known
            if known.probe.done():
                return known.probe.result()
            try:
                return await asyncio.wait_for(asyncio.shield(known.probe), timeout_s)
            except asyncio.TimeoutError:
                return False

        return list(await asyncio.gather(*(one(w) for w in workers)))

    @staticmethod
    async def probe(workers: list[Worker], timeout_s: float) -> list[bool]:
        """Asks these workers GetInfo now; True for those that answer within timeout_s."""
        return list(await asyncio.gather(*(answers(w, timeout_s) for w in workers)))

    async def close(self) -> None:
        if self._membership is not None:
            membership, self._membership = self._membership, None
            await membership.aclose()
        self._closed = True
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        with self._lock:
            workers = list(self._workers.values())
            self._workers.clear()
            self._rebuild()
        await asyncio.gather(*(w.channel.close() for w in workers), *self._leaving)
        if self._forwarders is not None:
            forwarders, self._forwarders = self._forwarders, None
            await asyncio.to_thread(forwarders.close)


_PROBED = (WorkerState.PENDING, WorkerState.UNHEALTHY)


class _Reachability:
    """One worker's latest shared probe (`WorkerPool.reachable`) and when it answered."""

    def __init__(self, worker: Worker, probe, loop: asyncio.AbstractEventLoop) -> None:
        self.worker = worker
        self.probe: asyncio.Future[bool] = asyncio.ensure_future(probe)
        self.answered_at = 0.0  # loop time of the answer, once the probe is done
        self.probe.add_done_callback(lambda _: setattr(self, "answered_at", loop.time()))

    def stale(self, now: float, max_age_s: float) -> bool:
        """Answered longer than max_age_s ago (a probe still in flight is never stale)."""
        return self.probe.done() and now - self.answered_at >= max_age_s


async def answers(worker: Worker, timeout_s: float) -> bool:
    """True when the worker answers GetInfo within timeout_s."""
    try:
        await ask_info(worker, timeout_s)
    except WorkerCallError:
        return False
    return True


class WorkerCallError(Exception):
    """A call to a worker did not answer: its status, or its channel closed under it."""


async def ask_info(
    worker: Worker, timeout_s: float, wait_for_ready: bool = False
) -> expert_pb2.WorkerInfo:
    """The worker's GetInfo; WorkerCallError when it fails, including when the worker leaves
    the pool meanwhile (its channel closing cancels the call or refuses to start it)."""
    try:
        return await worker.stub.GetInfo(
            expert_pb2.WorkerInfoRequest(), timeout=timeout_s, wait_for_ready=wait_for_ready
        )
    except grpc.aio.AioRpcError as err:
        raise WorkerCallError(f"{err.code().name}: {err.details()}") from err
    except grpc.aio.UsageError as err:
        raise WorkerCallError(f"the worker left: {err}") from err
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the caller is being cancelled, not the call
        raise WorkerCallError("the worker left: its channel closed") from None
