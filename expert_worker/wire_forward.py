"""Forward on raw protobuf bytes: the worker's hot path, free of protobuf copies.

The request is read in place (`moe_core.wire.decode_forward_request`); its token bytes are copied
once into pinned memory and go to the GPU without a synchronization. The result rows come back to
pinned memory in one transfer, with the device's verdict on the tokens' finiteness (the call's
one synchronization), and the reply is one `bytes.join` of a small header and those rows
(`moe_core.wire.encode_forward_response`). The checks and the experts are `service.compute`'s, so
answers and refusals are exactly those of `service.forward` (the protobuf path, which tools and
tests keep using); the bytes on the wire are the same ExpertForwardResponse.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import grpc
import torch

from expert_worker import service
from moe_core import token_format as tf
from moe_core import wire

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard
    from expert_worker.metrics import WorkerMetrics

_RESULT_DTYPES = {tf.FP32: torch.float32, tf.BF16: torch.bfloat16}


def forward_bytes(shard: ExpertShard, raw: bytes, metrics: WorkerMetrics | None = None) -> bytes:
    """A serialized ExpertForwardRequest -> the serialized ExpertForwardResponse.

    Raises `service.RequestError` (INVALID_ARGUMENT for a malformed message or request,
    RESOURCE_EXHAUSTED when the device runs out of memory); metrics records answered batches."""
    start = time.perf_counter()
    request = decode(raw)
    rows, seconds = forward_rows(shard, request, metrics, start=start)
    data = memoryview(rows.reshape(-1).view(torch.uint8).numpy())
    return wire.encode_forward_response(
        request.result_format, rows.shape[0], rows.shape[1], data, seconds
    )


def decode(raw: bytes) -> wire.ForwardRequestView:
    """The request read in place; RequestError (INVALID_ARGUMENT) when it is not one."""
    try:
        return wire.decode_forward_request(raw)
    except wire.WireError as err:
        raise service.RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, wire.malformed_forward(err)
        ) from err


def forward_rows(
    shard: ExpertShard,
    request: wire.ForwardRequestView,
    metrics: WorkerMetrics | None = None,
    out: torch.Tensor | None = None,
    start: float | None = None,
    in_place: bool = False,
) -> tuple[torch.Tensor, float]:
    """The experts on a request -> (result rows [T, H] on the host in the result dtype, seconds
    since start). out: uint8 host memory to put them in (pinned when the shard is on a GPU);
    RequestError (INTERNAL) when they do not fit. in_place: see `service.compute`."""
    start = time.perf_counter() if start is None else start
    done = service.compute(shard, request, in_place)  # checks result_format is FP32 or BF16
    rows = done.rows.to(_RESULT_DTYPES[request.result_format]).contiguous()  # [T, H]
    if out is not None:
        nbytes = rows.numel() * rows.element_size()
        if nbytes > out.numel():
            raise service.RequestError(
                grpc.StatusCode.INTERNAL, f"{nbytes} bytes of result rows, room for {out.numel()}"
            )
        host = out[:nbytes].view(rows.dtype).view(rows.shape)
        host.copy_(rows, non_blocking=True)
    elif rows.device.type == "cuda":
        host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        host.copy_(rows, non_blocking=True)
    else:
        host = rows
    nonfinite = None
    if done.nonfinite is not None:  # the token checks ride with the rows: one sync
        nonfinite = torch.empty(done.nonfinite.shape, dtype=torch.bool, pin_memory=True)
        nonfinite.copy_(done.nonfinite, non_blocking=True)
    if rows.device.type == "cuda":
        torch.cuda.current_stream(rows.device).synchronize()
    service.settle(shard, done, nonfinite)
    seconds = time.perf_counter() - start
    if metrics is not None:
        metrics.record_batch(done.num_tokens, done.expert_tokens, seconds)
    return host, seconds
