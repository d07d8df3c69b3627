"""Remote expert backend: dispatch a layer's tokens to the expert workers and combine the results.

Shapes: T = tokens of the step, k = experts per token, H = hidden, E = routed experts,
T_w = tokens sent to worker w (each once), S_w = slots per token at w (its most experts at w).

`dispatch` runs on the model's thread: it plans once per layer, encodes each worker's rows and
submits every worker's Forward call at once onto the router's event loop. The model computes its
shared experts meanwhile; `combine` then waits for the calls and adds each worker's rows back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from dataclasses import dataclass

import grpc
import torch

from moe_core import token_format
from moe_core.precision import Precision
from protos import expert_pb2
from router.workers import WorkerRegistry

_WAIT_SLACK_S = 5.0  # combine waits this much longer than the RPC deadline before giving up


class ExpertWorkerError(RuntimeError):
    """An expert worker call failed; the step that needed it fails."""

    def __init__(self, address: str, layer: int, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"expert worker {address} failed on layer {layer}: {code.name}: {details}")
        self.address = address
        self.code = code


@dataclass
class WorkerPlan:
    """What one worker gets in one layer."""

    worker: int  # index in the registry
    rows: torch.Tensor  # [T_w] int64, rows of x, ascending
    expert_ids: torch.Tensor  # [T_w, S_w] int64 global ids held by the worker, -1 = empty slot
    weights: torch.Tensor  # [T_w, S_w] float32 routing weights, 0 in empty slots


def plan_dispatch(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_owner: torch.Tensor
) -> list[WorkerPlan]:
    """Splits a layer's routing between workers.

    topk_ids [T, k] int64 global ids, topk_weights [T, k] float32, expert_owner [E] int64 worker
    index of each expert -> one plan per worker that at least one token chose, by worker index.
    """
    topk_ids = topk_ids.cpu()
    topk_weights = topk_weights.float().cpu()
    owner = expert_owner[topk_ids]  # [T, k]
    plans = []
    for worker in torch.unique(owner).tolist():
        mine = owner == worker  # [T, k]
        rows = mine.any(dim=1).nonzero().squeeze(1)  # [T_w]
        mine = mine[rows]  # [T_w, k]
        # stable sort puts each row's slots at this worker first, in their top-k order
        order = torch.argsort((~mine).to(torch.int8), dim=1, stable=True)
        slots = int(mine.sum(dim=1).max())
        kept = torch.gather(mine, 1, order)[:, :slots]  # [T_w, S_w]
        ids = torch.gather(topk_ids[rows], 1, order)[:, :slots]
        weights = torch.gather(topk_weights[rows], 1, order)[:, :slots]
        plans.append(
            WorkerPlan(
                worker=worker,
                rows=rows,
                expert_ids=ids.masked_fill(~kept, -1),
                weights=weights.masked_fill(~kept, 0.0),
            )
        )
    return plans


@dataclass
class DispatchHandle:
    layer: int
    shape: tuple[int, int]  # (T, H) of the combined output
    device: torch.device
    plans: list[WorkerPlan]
    futures: list[concurrent.futures.Future]  # one ExpertForwardResponse per plan


class RemoteExpertBackend:
    """`ExpertBackend` over gRPC expert workers, driven from the model's thread."""

    def __init__(
        self,
        workers: WorkerRegistry,
        loop: asyncio.AbstractEventLoop,
        precision: Precision,
        timeout_s: float,
    ) -> None:
        self.workers = workers
        self.loop = loop
        self.precision = Precision(precision)
        self.timeout_s = timeout_s
        self._result_format = token_format.result_format(self.precision)

    def dispatch(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> DispatchHandle:
        """x [T, H] model dtype, topk_ids [T, k] int64, topk_weights [T, k] float32 -> handle."""
        if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"dispatch needs x [T, H] and topk ids/weights [T, k], got {tuple(x.shape)}, "
                f"{tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
            )
        plans = plan_dispatch(topk_ids, topk_weights, self.workers.expert_owner)
        self.workers.record_tokens(topk_ids)
        futures = []
        for plan in plans:
            request = expert_pb2.ExpertForwardRequest(
                layer=layer,
                tokens=token_format.encode_tokens(x[plan.rows.to(x.device)], self.precision),
                slots=plan.expert_ids.shape[1],
                expert_ids=token_format.pack_expert_ids(plan.expert_ids),
                expert_weights=token_format.pack_expert_weights(plan.weights),
                result_format=self._result_format,
            )
            call = self.workers.forward(plan.worker, request, self.timeout_s)
            futures.append(asyncio.run_coroutine_threadsafe(call, self.loop))
        return DispatchHandle(layer, (x.shape[0], x.shape[1]), x.device, plans, futures)

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        """Waits for every worker of the handle -> [T, H] float32, the weighted expert sum."""
        out = torch.zeros(handle.shape, dtype=torch.float32, device=handle.device)
        try:
            for plan, future in zip(handle.plans, handle.futures, strict=True):
                rows = self._result(handle, plan, future)  # [T_w, H] float32
                out.index_add_(0, plan.rows.to(handle.device), rows)
        finally:
            for future in handle.futures:
                future.cancel()  # after a failure, stop waiting for the others
        return out

    def _result(
        self, handle: DispatchHandle, plan: WorkerPlan, future: concurrent.futures.Future
    ) -> torch.Tensor:
        address = self.workers.address(plan.worker)
        try:
            response = future.result(timeout=self.timeout_s + _WAIT_SLACK_S)
            rows = token_format.decode_result(response.result, handle.device)
        except grpc.aio.AioRpcError as err:
            raise ExpertWorkerError(address, handle.layer, err.code(), err.details() or "") from err
        except concurrent.futures.TimeoutError as err:
            raise ExpertWorkerError(
                address, handle.layer, grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"
            ) from err
        except concurrent.futures.CancelledError as err:
            raise ExpertWorkerError(
                address, handle.layer, grpc.StatusCode.CANCELLED, "the call was cancelled"
            ) from err
        except token_format.WireFormatError as err:
            raise ExpertWorkerError(
                address, handle.layer, grpc.StatusCode.INTERNAL, f"bad result: {err}"
            ) from err
        expected = (plan.rows.numel(), handle.shape[1])
        if tuple(rows.shape) != expected:
            raise ExpertWorkerError(
                address,
                handle.layer,
                grpc.StatusCode.INTERNAL,
                f"returned {tuple(rows.shape)} result rows for {expected} tokens",
            )
        return rows
