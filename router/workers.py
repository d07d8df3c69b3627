"""The expert workers behind the router: channels, what each holds, and the tokens sent to each.

At start-up the router asks every worker `GetInfo`, checks that all serve the router's model at its
precision and that every routed expert is held, and builds the expert -> worker map that dispatch
uses. Channels stay open for the router's lifetime.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass

import grpc
import torch

from moe_core.grpc_server import GRPC_OPTIONS, format_ids
from moe_core.precision import Precision
from moe_core.spec import ModelSpec
from protos import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)


class WorkerSetupError(RuntimeError):
    """The workers cannot serve the router's model: unreachable, inconsistent or incomplete."""


def expert_owners(
    infos: list[expert_pb2.WorkerInfo], addresses: list[str], spec: ModelSpec, precision: Precision
) -> list[int]:
    """Checks the workers' descriptions -> the worker index that serves each expert.

    An expert held by several workers goes to the first of them.
    """
    problems = []
    owners: list[int | None] = [None] * spec.num_experts
    for index, (info, address) in enumerate(zip(infos, addresses, strict=True)):
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
            elif owners[expert] is None:
                owners[expert] = index
    missing = [e for e, owner in enumerate(owners) if owner is None]
    if missing and not problems:
        problems.append(f"no worker holds experts {format_ids(missing)}")
    if problems:
        raise WorkerSetupError("expert workers do not fit the model: " + "; ".join(problems))
    return [owner for owner in owners if owner is not None]


@dataclass
class Worker:
    address: str
    channel: grpc.aio.Channel
    stub: expert_pb2_grpc.ExpertServiceStub
    expert_ids: tuple[int, ...]


class WorkerRegistry:
    def __init__(self, workers: list[Worker], owners: list[int]) -> None:
        self.workers = workers
        self.expert_owner = torch.tensor(owners, dtype=torch.int64)  # [E] worker index
        self._tokens = torch.zeros(len(owners), dtype=torch.int64)  # [E] tokens sent so far
        self._lock = threading.Lock()  # dispatch counts on the model thread; info reads on the loop

    @classmethod
    async def connect(
        cls, addresses: list[str], spec: ModelSpec, precision: Precision, timeout_s: float
    ) -> WorkerRegistry:
        """Opens a channel per worker and asks each GetInfo (waiting up to timeout_s for it)."""
        channels = [grpc.aio.insecure_channel(a, options=GRPC_OPTIONS) for a in addresses]
        stubs = [expert_pb2_grpc.ExpertServiceStub(c) for c in channels]
        try:
            calls = [_get_info(s, a, timeout_s) for s, a in zip(stubs, addresses, strict=True)]
            infos = await asyncio.gather(*calls)
            owners = expert_owners(list(infos), list(addresses), spec, precision)
        except BaseException:
            await asyncio.gather(*(c.close() for c in channels))
            raise
        workers = [
            Worker(address, channel, stub, tuple(info.expert_ids))
            for address, channel, stub, info in zip(addresses, channels, stubs, infos, strict=True)
        ]
        for worker in workers:
            log.info(
                "worker %s holds experts %s", worker.address, format_ids(list(worker.expert_ids))
            )
        return cls(workers, owners)

    def address(self, index: int) -> str:
        return self.workers[index].address

    async def forward(
        self, index: int, request: expert_pb2.ExpertForwardRequest, timeout_s: float
    ) -> expert_pb2.ExpertForwardResponse:
        return await self.workers[index].stub.Forward(request, timeout=timeout_s)

    def record_tokens(self, topk_ids: torch.Tensor) -> None:
        """Counts the tokens routed to each expert; topk_ids [T, k] int64 global ids."""
        counts = torch.bincount(topk_ids.reshape(-1).cpu(), minlength=len(self._tokens))
        with self._lock:
            self._tokens += counts

    def expert_tokens(self, index: int) -> dict[int, int]:
        """Tokens the router has sent to each expert this worker serves (global id -> count)."""
        with self._lock:
            counts = self._tokens.tolist()
        owner = self.expert_owner.tolist()
        return {e: counts[e] for e in self.workers[index].expert_ids if owner[e] == index}

    async def probe(self, timeout_s: float) -> list[bool]:
        """Asks every worker GetInfo now; True for those that answer within timeout_s."""

        async def ping(worker: Worker) -> bool:
            try:
                await worker.stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return False
            return True

        return list(await asyncio.gather(*(ping(w) for w in self.workers)))

    async def close(self) -> None:
        await asyncio.gather(*(w.channel.close() for w in self.workers))


async def _get_info(
    stub: expert_pb2_grpc.ExpertServiceStub, address: str, timeout_s: float
) -> expert_pb2.WorkerInfo:
    try:
        return await stub.GetInfo(
            expert_pb2.WorkerInfoRequest(), timeout=timeout_s, wait_for_ready=True
        )
    except grpc.aio.AioRpcError as err:
        raise WorkerSetupError(
            f"expert worker {address} did not answer GetInfo: {err.code().name}: {err.details()}"
        ) from err
