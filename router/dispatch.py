"""Remote expert backend: dispatch a layer's tokens to the expert workers and combine the results.

Shapes: T = tokens of the step, k = experts per token, H = hidden, E = routed experts,
T_w = tokens sent to worker w (each once), S_w = slots per token at w (its most experts at w).

`dispatch` runs on the model's thread: it asks the pool which replica serves each expert, plans
once per layer, stages each worker's rows on the host and submits every worker's Forward call at
once to a transport (router.calls): the router's event loop, or for layers of at least
`forwarded_min_bytes`, forwarder processes (router.forwarders), or for every layer the native
gRPC client (router.native_transport). The model computes its shared experts meanwhile;
`combine` then waits for the calls and adds each worker's rows back.

Wire path (no needless copies): the layer's tokens are converted to the wire format once on their
device, every worker's rows are gathered there into one buffer and copied to pinned host memory
in one transfer (one synchronization per layer, not one per worker); each request is then one
`bytes.join` of small headers and that memory (`moe_core.wire`, no protobuf copies), sent on a
persistent channel as raw bytes. A reply is read in place and its rows copied once into pinned
memory (through forwarders: they are already in the pinned arena), from where they go to the
device asynchronously. A worker's rows are split into several calls when a message would exceed
`max_message_bytes` (large messages are slow in gRPC's Python runtime), so that its calls also
pipeline.

A failed call takes its worker out of routing and its rows go again, to other replicas, up to
`attempts` times. Experts that no healthy worker serves are handled by `ExpertLossPolicy`: FAIL
raises `ExpertsUnavailableError` naming them and the rows that chose them; DEGRADE drops them from
those tokens' top-k and scales the rest up to the tokens' full routing weight, and the step's
report (`take_dropped`) says which tokens lost which experts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from moe_core import token_format, wire
from moe_core.fp8 import num_blocks, quantize_tokens
from moe_core.precision import Precision
from router.arena_calls import CallError
from router.calls import ForwardCall, LoopTransport, Request, Transport
from router.config import ExpertLossPolicy
from router.expert_backend import ExpertsUnavailableError
from router.forwarders import ForwarderPool
from router.metrics import RouterMetrics
from router.profiler import StepProfiler, timed
from router.workers import Route, Worker, WorkerPool

_WAIT_SLACK_S = 5.0  # combine waits this much longer than the RPC deadline before giving up
_BUSY_PAUSE_S = 0.01  # before resending to a busy worker, times the attempt
# Largest request or reply of one Forward call; a worker's rows are split to stay below it.
# Measured on loopback (bench/transport.py): 4-8 MiB messages move fastest in Python gRPC; above
# about 32 MiB every message is a fresh mmap whose page faults halve the throughput.
MAX_MESSAGE_BYTES = 8 << 20
# With forwarder processes, a layer whose token rows stage at least this many bytes goes through
# them; smaller ones (decode steps) go on the router's event loop, for which the forwarders' extra
# hop costs more than it saves (bench/transport.py, docs/performance.md).
FORWARDED_MIN_BYTES = 8 << 20
_RESULT_DTYPES = {token_format.FP32: torch.float32, token_format.BF16: torch.bfloat16}


class ExpertWorkerError(RuntimeError):
    """An expert worker call failed and no retry was left; the step that needed it fails.
    local: the router's side failed (a forwarder process died), not the worker."""

    def __init__(
        self, address: str, layer: int, code: grpc.StatusCode, details: str, local: bool = False
    ) -> None:
        super().__init__(f"expert worker {address} failed on layer {layer}: {code.name}: {details}")
        self.address = address
        self.code = code
        self.details = details
        self.local = local


@dataclass
class WorkerPlan:
    """What one worker gets in one layer."""

    worker: int  # index in the route's workers
    rows: torch.Tensor  # [T_w] int64, rows of x, ascending
    expert_ids: torch.Tensor  # [T_w, S_w] int64 global ids held by the worker, -1 = empty slot
    weights: torch.Tensor  # [T_w, S_w] float32 routing weights, 0 in empty slots


def plan_dispatch(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert_owner: torch.Tensor
) -> list[WorkerPlan]:
    """Splits a layer's routing between workers.

    topk_ids [T, k] int64 global ids (-1 = empty slot), topk_weights [T, k] float32, expert_owner
    [E] int64 worker index of each expert (every chosen expert must have one) -> one plan per
    worker that at least one token chose, by worker index. (numpy: these arrays are small, and
    a numpy call costs a fraction of a torch CPU op.)
    """
    ids = topk_ids.cpu().numpy()
    weights = topk_weights.float().cpu().numpy()
    used = ids >= 0
    owner = np.where(used, expert_owner.cpu().numpy()[np.maximum(ids, 0)], -1)  # [T, k]
    plans = []
    for worker in np.unique(owner[used]).tolist():
        mine = owner == worker  # [T, k]
        rows = np.flatnonzero(mine.any(axis=1))  # [T_w]
        mine = mine[rows]  # [T_w, k]
        # each chosen slot moves to the left, keeping the top-k order: slot = its rank in the row
        rank = np.cumsum(mine, axis=1) - 1  # [T_w, k]
        r, j = np.nonzero(mine)  # [n], [n]
        slot = rank[r, j]
        worker_ids = np.full((rows.size, int(rank[:, -1].max()) + 1), -1, dtype=np.int64)
        worker_weights = np.zeros(worker_ids.shape, dtype=np.float32)  # [T_w, S_w]
        worker_ids[r, slot] = ids[rows[r], j]
        worker_weights[r, slot] = weights[rows[r], j]
        plans.append(
            WorkerPlan(
                worker=worker,
                rows=torch.from_numpy(rows.astype(np.int64)),
                expert_ids=torch.from_numpy(worker_ids),
                weights=torch.from_numpy(worker_weights),
            )
        )
    return plans


def split_plan(plan: WorkerPlan, max_rows: int) -> list[WorkerPlan]:
    """plan -> plans of at most max_rows rows each (one Forward call each), in row order."""
    if plan.rows.numel() <= max_rows:
        return [plan]
    return [
        WorkerPlan(
            plan.worker,
            plan.rows[i : i + max_rows],
            plan.expert_ids[i : i + max_rows],
            plan.weights[i : i + max_rows],
        )
        for i in range(0, plan.rows.numel(), max_rows)
    ]


@dataclass
class WireTokens:
    """A layer's tokens in the wire format, on their device, made once per layer.

    data: [T, row bytes] uint8, the raw rows of the TokenBatch `data`; scales: [T, scale bytes]
    uint8 (FP8's float32 scales) or None."""

    format: int
    data: torch.Tensor
    scales: torch.Tensor | None

    @classmethod
    def of(cls, x: torch.Tensor, precision: Precision) -> WireTokens:
        """x [T, H] -> the bytes `token_format.encode_tokens(x, precision)` would send."""
        fmt = token_format.token_format(precision)
        if precision == Precision.FP8:
            x8, scales = quantize_tokens(x)  # [T, H] e4m3, [T, ceil(H/128)] float32
            return cls(fmt, x8.view(torch.uint8), scales.view(torch.uint8))
        dtype = torch.bfloat16 if precision == Precision.BF16 else torch.float32
        data = x.to(dtype).contiguous()
        return cls(fmt, data.view(torch.uint8).view(x.shape[0], -1), None)

    @staticmethod
    def row_widths(hidden: int, precision: Precision) -> tuple[int, int]:
        """-> (data, scales) bytes of one token row of `hidden` channels in the wire format."""
        fmt = token_format.token_format(precision)
        data = hidden * token_format.token_dtype(fmt).itemsize
        return data, num_blocks(hidden) * 4 if fmt == token_format.FP8 else 0  # float32 scales

    @property
    def row_bytes(self) -> int:
        return self.data.shape[1] + (0 if self.scales is None else self.scales.shape[1])

    def stage(
        self, index: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """index [N] int64 rows, on the tokens' device -> (data [N, row bytes], scales) uint8 on
        the host. Tokens on a GPU: pinned, one gather on the device, one transfer, one
        synchronization; tokens on the host (a CPU router, or staged): one gather there.
        out: host tensors of those shapes to write them into (pinned ones when the tokens are
        on a GPU)."""
        on_host = self.data.device.type == "cpu"
        if out is not None and on_host:  # gathered straight into out: one copy
            torch.index_select(self.data, 0, index, out=out[0])
            if self.scales is not None:
                torch.index_select(self.scales, 0, index, out=out[1])
            return out
        data = self.data.index_select(0, index)
        scales = None if self.scales is None else self.scales.index_select(0, index)
        if out is not None:
            out[0].copy_(data, non_blocking=True)
            if scales is not None:
                out[1].copy_(scales, non_blocking=True)
            data, scales = out
        elif not on_host:
            data = _to_pinned(data)
            scales = None if scales is None else _to_pinned(scales)
        if not on_host:
            torch.cuda.current_stream(self.data.device).synchronize()
        return data, scales


def _check_staged(staged: WireTokens, x: torch.Tensor, precision: Precision) -> None:
    """Staged tokens must be x's rows in the backend's wire format, on the host."""
    fmt = token_format.token_format(precision)
    if staged.data.device.type != "cpu" or staged.format != fmt:
        raise ValueError(
            f"staged tokens must be {token_format.format_name(fmt)} on the host, got "
            f"{token_format.format_name(staged.format)} on {staged.data.device}"
        )
    data_bytes, scale_bytes = WireTokens.row_widths(x.shape[1], precision)
    scales = (0, 0) if staged.scales is None else tuple(staged.scales.shape)
    if tuple(staged.data.shape) != (x.shape[0], data_bytes) or scales[1] != scale_bytes:
        raise ValueError(
            f"staged tokens of {tuple(staged.data.shape)} bytes (scales {scales}) for x "
            f"{tuple(x.shape)}: {(x.shape[0], data_bytes)} and {scale_bytes} scale bytes a row"
        )


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of a device tensor into pinned host memory (synchronize to read)."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on device, without a synchronization (through pinned memory)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class DispatchHandle:
    layer: int
    x: torch.Tensor  # [T, H] the layer's tokens, kept for resends
    total_weight: torch.Tensor  # [T] float32 routing weight of each token's top-k
    wire: WireTokens | None = None  # x in the wire format, once it was first sent
    calls: list[ForwardCall] = field(default_factory=list)
    failed: set[Worker] = field(default_factory=set)  # workers whose calls failed this layer
    dropped: dict[int, set[int]] = field(default_factory=dict)  # row -> experts dropped
    dropped_weight: torch.Tensor | None = None  # [T] float32, DEGRADE only
    started: float = field(default_factory=time.perf_counter)  # for the layer's latency metric
    host_blocks: list = field(default_factory=list)  # forwarders: its arena blocks


class RemoteExpertBackend:
    """`ExpertBackend` over gRPC expert workers, driven from the model's thread."""

    def __init__(
        self,
        workers: WorkerPool,
        loop: asyncio.AbstractEventLoop,
        precision: Precision,
        timeout_s: float,
        on_expert_loss: ExpertLossPolicy = ExpertLossPolicy.FAIL,
        attempts: int = 3,
        metrics: RouterMetrics | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        forwarders: ForwarderPool | None = None,
        forwarded_min_bytes: int = FORWARDED_MIN_BYTES,
        transport: Transport | None = None,
    ) -> None:
        if max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.workers = workers
        # calls go on the router's event loop, or (large layers) through forwarder processes
        self.loop_transport = LoopTransport(loop, metrics)
        self.transport = transport  # every layer's calls, when given (the native client)
        self.forwarders = forwarders
        self.forwarded_min_bytes = forwarded_min_bytes
        self.precision = Precision(precision)
        self.timeout_s = timeout_s
        self.on_expert_loss = ExpertLossPolicy(on_expert_loss)
        self.attempts = attempts
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.profiler: StepProfiler | None = None  # times the wait for the workers ("experts")
        self._result_format = token_format.result_format(self.precision)
        self._result_dtype = _RESULT_DTYPES[self._result_format]
        self._dropped: dict[int, set[int]] = {}  # this step's drops: row -> experts
        self._wait_s = 0.0  # combine's time blocked on the workers since take_wait_seconds
        self.retries = 0  # calls sent again after a failure, since start

    @property
    def staged_precision(self) -> Precision:
        """The precision of the tokens that `dispatch` takes already staged on the host."""
        return self.precision

    def dispatch(
        self,
        layer: int,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        staged: WireTokens | None = None,
    ) -> DispatchHandle:
        """x [T, H] model dtype, topk_ids [T, k] int64, topk_weights [T, k] float32 -> handle.

        staged: x already in the wire format of `staged_precision`, on the host (the decode
        graphs write it there, with the top-k on the host too): then the layer's tokens are
        neither converted nor copied from the device, and dispatch waits for nothing."""
        if x.dim() != 2 or topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"dispatch needs x [T, H] and topk ids/weights [T, k], got {tuple(x.shape)}, "
                f"{tuple(topk_ids.shape)}, {tuple(topk_weights.shape)}"
            )
        if staged is not None:
            _check_staged(staged, x, self.precision)
        topk_ids, topk_weights = topk_ids.cpu(), topk_weights.float().cpu()
        counts = torch.bincount(topk_ids.reshape(-1), minlength=self.workers.spec.num_experts)
        self.workers.record_tokens(counts)
        if self.metrics is not None:
            self.metrics.record_expert_tokens(layer, counts)
        handle = DispatchHandle(layer, x, topk_weights.sum(dim=1), wire=staged)
        rows = torch.arange(x.shape[0])
        self._send(handle, rows, topk_ids, topk_weights, self.workers.route(), attempt=1)
        return handle

    def combine(self, handle: DispatchHandle) -> torch.Tensor:
        """Waits for every worker of the handle (sending failed rows again) -> [T, H] float32,
        the weighted expert sum."""
        out = torch.zeros(handle.x.shape, dtype=torch.float32, device=handle.x.device)
        compute: dict[str, float] = {}  # seconds each worker computed in this layer
        waited = time.perf_counter()  # the time blocked on the workers, for the overlap policy
        with timed(self.profiler, "experts"):  # profiled: one phase, the wait for every worker
            concurrent.futures.wait([c.future for c in handle.calls], self.timeout_s)
        self._wait_s += time.perf_counter() - waited
        answered: list[tuple[ForwardCall, memoryview]] = []  # result rows on the host
        try:
            done = 0
            while done < len(handle.calls):  # resends append to calls
                call = handle.calls[done]
                done += 1
                try:
                    rows, compute_s = self._result(handle, call)  # [T_w, H] result dtype bytes
                except ExpertWorkerError as err:
                    self._retry(handle, call, err)
                    continue
                address = call.worker.address
                compute[address] = compute.get(address, 0.0) + compute_s
                answered.append((call, rows))
            self._add_rows(out, answered)
        finally:  # after a failure, stop the calls still going
            running = [c for c in handle.calls if not c.future.cancel() and not c.future.done()]
            for transport in {call.transport for call in handle.calls}:
                mine = [c for c in running if c.transport is transport]
                if mine:
                    transport.cancel(mine)
                transport.finish(handle)
        if handle.dropped_weight is not None:
            self._renormalize(handle, out)
        for row, experts in handle.dropped.items():
            self._dropped.setdefault(row, set()).update(experts)
        if self.metrics is not None:
            self.metrics.record_layer(handle.layer, time.perf_counter() - handle.started)
        if self.profiler is not None:
            self.profiler.add_info("worker_compute", max(compute.values(), default=0.0))
        return out

    def take_wait_seconds(self) -> float:
        wait_s, self._wait_s = self._wait_s, 0.0
        return wait_s

    def take_dropped(self) -> dict[int, set[int]]:
        """The experts dropped from each token row since the last call (DEGRADE), for the step."""
        dropped, self._dropped = self._dropped, {}
        return dropped

    def _send(
        self,
        handle: DispatchHandle,
        rows: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        route: Route,
        attempt: int,
    ) -> None:
        """Sends rows of x (with their slots: ids/weights [n, k]) to the workers route names."""
        lost = route.missing(ids)  # [n, k]
        if bool(lost.any()):
            ids, weights = self._lose(handle, rows, ids, weights, lost)
        if handle.wire is None:
            handle.wire = WireTokens.of(handle.x, self.precision)
        tokens, hidden = handle.wire, handle.x.shape[1]
        result_row_bytes = hidden * self._result_dtype.itemsize
        plans = []
        for plan in plan_dispatch(ids, weights, route.owner):
            plan.rows = rows[plan.rows]
            slot_bytes = plan.expert_ids.shape[1] * 8  # int32 id + float32 weight
            row_bytes = max(tokens.row_bytes + slot_bytes, result_row_bytes)
            plans += split_plan(plan, max(1, self.max_message_bytes // row_bytes))
        if not plans:
            return
        all_rows = torch.cat([plan.rows for plan in plans])  # [N] rows of x, plan after plan
        index = _to_device(all_rows, handle.x.device)  # for combine's index_add
        transport = self._transport(index.numel() * tokens.row_bytes)
        at = index if tokens.data.device == index.device else all_rows  # staged: on the host
        data, scales = transport.stage(tokens, at, handle)  # [N, bytes] on the host
        calls = []
        start = 0
        for plan in plans:
            n = plan.rows.numel()
            request = Request(
                layer=handle.layer,
                token_format=tokens.format,
                result_format=self._result_format,
                result_itemsize=self._result_dtype.itemsize,
                data=data[start : start + n],
                scales=None if scales is None else scales[start : start + n],
                expert_ids=plan.expert_ids.to(torch.int32).contiguous(),
                expert_weights=plan.weights.to(torch.float32).contiguous(),
                hidden=hidden,
            )
            worker = route.workers[plan.worker]
            rows = index[start : start + n]
            calls.append(ForwardCall(plan, worker, request, attempt, rows, transport))
            start += n
        handle.calls += calls
        transport.submit(handle, calls, self.timeout_s)

    def _transport(self, staged_bytes: int) -> Transport:
        if self.transport is not None:
            return self.transport
        if self.forwarders is not None and staged_bytes >= self.forwarded_min_bytes:
            return self.forwarders
        return self.loop_transport

    def _lose(
        self,
        handle: DispatchHandle,
        rows: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        lost: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots lost [n, k] name experts nobody serves: raise (FAIL), or drop them (DEGRADE)."""
        experts = torch.unique(ids[lost]).tolist()
        hit = lost.any(dim=1)  # [n]
        if self.on_expert_loss is ExpertLossPolicy.FAIL:
            raise ExpertsUnavailableError(handle.layer, experts, rows[hit])
        if handle.dropped_weight is None:
            handle.dropped_weight = torch.zeros_like(handle.total_weight)
        handle.dropped_weight.index_add_(0, rows, (weights * lost).sum(dim=1))
        for row, row_ids, row_lost in zip(rows[hit].tolist(), ids[hit], lost[hit], strict=True):
            handle.dropped.setdefault(row, set()).update(row_ids[row_lost].tolist())
        return ids.masked_fill(lost, -1), weights.masked_fill(lost, 0.0)

    @staticmethod
    def _renormalize(handle: DispatchHandle, out: torch.Tensor) -> None:
        """Scales tokens that lost experts so their kept weights add up to the full weight."""
        kept = handle.total_weight - handle.dropped_weight  # [T]
        scale = torch.where(kept > 1e-12, handle.total_weight / kept.clamp(min=1e-12), 0.0)
        out.mul_(scale.to(out.device).unsqueeze(1))

    def _retry(self, handle: DispatchHandle, call: ForwardCall, err: ExpertWorkerError) -> None:
        """The call failed: its worker leaves routing and its rows go to other replicas. A busy
        worker (RESOURCE_EXHAUSTED) stays: after a short pause the rows go to any replica, it
        included. After a local failure (a forwarder process died) the worker stays too."""
        busy = err.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        if not err.local:
            self.workers.report_failure(call.worker, err.code, err.details)
            if not busy:
                handle.failed.add(call.worker)
        if call.attempt >= self.attempts:
            raise err
        self.retries += 1
        if self.metrics is not None:
            self.metrics.record_retry(call.worker.address)
        if busy:
            time.sleep(_BUSY_PAUSE_S * call.attempt)
        route = self.workers.route(exclude=frozenset(handle.failed))
        plan = call.plan
        self._send(handle, plan.rows, plan.expert_ids, plan.weights, route, call.attempt + 1)

    def _result(self, handle: DispatchHandle, call: ForwardCall) -> tuple[memoryview, float]:
        """-> (the result rows' bytes [T_w, H] in the result format on the host, the worker's
        compute seconds)."""
        address, layer = call.worker.address, handle.layer
        try:
            pending = not call.future.done()  # (profiled: only resends are still pending here)
            with timed(self.profiler if pending else None, "experts"):
                reply = call.future.result(timeout=self.timeout_s + _WAIT_SLACK_S)
            rows = self._checked_rows(reply.result, call, handle.x.shape[1])
        except grpc.aio.AioRpcError as err:
            raise ExpertWorkerError(address, layer, err.code(), err.details() or "") from err
        except CallError as err:
            raise ExpertWorkerError(address, layer, err.code, err.details, err.local) from err
        except grpc.aio.UsageError as err:  # it left the pool: its channel closed
            raise ExpertWorkerError(
                address, layer, grpc.StatusCode.UNAVAILABLE, f"the worker left: {err}"
            ) from err
        except concurrent.futures.TimeoutError as err:
            raise ExpertWorkerError(
                address, layer, grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"
            ) from err
        except concurrent.futures.CancelledError as err:
            raise ExpertWorkerError(
                address, layer, grpc.StatusCode.CANCELLED, "the call was cancelled"
            ) from err
        except (token_format.WireFormatError, wire.WireError) as err:
            raise ExpertWorkerError(
                address, layer, grpc.StatusCode.INTERNAL, f"bad result: {err}"
            ) from err
        return rows, reply.compute_seconds

    def _checked_rows(
        self, result: wire.TokenBatchView, call: ForwardCall, hidden: int
    ) -> memoryview:
        """A reply's result rows -> their bytes, once they are what the call asked for."""
        num_tokens = call.plan.rows.numel()
        if result.format != self._result_format:
            raise token_format.WireFormatError(
                f"result is {token_format.format_name(result.format)}, asked for "
                f"{token_format.format_name(self._result_format)}"
            )
        expected = (num_tokens, hidden)
        if (result.num_tokens, result.hidden) != expected:
            raise token_format.WireFormatError(
                f"returned {(result.num_tokens, result.hidden)} result rows for {expected} tokens"
            )
        nbytes = num_tokens * hidden * self._result_dtype.itemsize
        if result.data.nbytes != nbytes:
            raise token_format.WireFormatError(
                f"result data has {result.data.nbytes} bytes, {expected} rows need {nbytes}"
            )
        return result.data

    def _add_rows(self, out: torch.Tensor, answered: list[tuple[ForwardCall, memoryview]]) -> None:
        """Adds every answered call's result rows into out [T, H] float32 at their token rows.
        Rows in the forwarders' arena go to the device from there, call by call; the others are
        copied once into one pinned buffer and go in one transfer, added by one index_add."""
        held = [(c, rows) for c, rows in answered if c.transport.results_held]
        mine = [(c, rows) for c, rows in answered if not c.transport.results_held]
        hidden, dtype = out.shape[1], self._result_dtype
        for call, rows in held:  # pinned already: no copy
            host = torch.from_numpy(np.frombuffer(rows, dtype=np.uint8))
            rows = host.view(dtype).view(-1, hidden).to(out.device, non_blocking=True)
            out.index_add_(0, call.index, rows.float())
        if not mine:
            return
        total = sum(rows.nbytes for _, rows in mine)
        host = torch.empty(total, dtype=torch.uint8, pin_memory=out.device.type == "cuda")
        flat, start = host.numpy(), 0
        for _, rows in mine:  # the one copy of the reply's bytes
            flat[start : start + rows.nbytes] = np.frombuffer(rows, dtype=np.uint8)
            start += rows.nbytes
        rows = host.view(dtype).view(-1, hidden).to(out.device, non_blocking=True)  # [N, H]
        index = mine[0][0].index if len(mine) == 1 else torch.cat([c.index for c, _ in mine])
        out.index_add_(0, index, rows.float())
