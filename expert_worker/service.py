"""What an expert worker answers, as plain functions over an `ExpertShard` (no sockets here).

`forward` checks a request against the shard before any compute: the layer is an MoE layer, the
tokens are in the shard's format with the model's hidden size, byte lengths that match and finite
values (NaN/Inf in the data or the FP8 scales), at least one token (an empty batch is an error:
the router never sends one), 1 to num_experts slots, expert ids held by this shard (or -1) and
finite weights in the used slots. A request that fails a check raises `RequestError` with the gRPC
status the client should see: INVALID_ARGUMENT for all of these, RESOURCE_EXHAUSTED when the
device runs out of memory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from expert_worker import staging
from moe_core import token_format as tf
from moe_core.grpc_server import format_ids
from protos import expert_pb2

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard, RoutePlan
    from expert_worker.metrics import WorkerMetrics


class RequestError(Exception):
    """A request this worker refuses: `code` is the gRPC status, `message` says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _check_layer(shard: ExpertShard, layer: int) -> None:
    spec = shard.spec
    if layer >= spec.num_layers:
        raise _invalid(f"layer {layer} does not exist: the model has {spec.num_layers} layers")
    if layer not in spec.moe_layers:
        raise _invalid(
            f"layer {layer} is not an MoE layer; MoE layers: {', '.join(map(str, spec.moe_layers))}"
        )


def _check_tokens(shard: ExpertShard, tokens: expert_pb2.TokenBatch) -> None:
    expected = tf.token_format(shard.precision)
    if tokens.format != expected:
        raise _invalid(
            f"tokens are {tf.format_name(tokens.format)}, this worker holds {shard.precision} "
            f"experts and takes {tf.format_name(expected)}"
        )
    if tokens.hidden != shard.spec.hidden_size:
        raise _invalid(
            f"tokens have hidden size {tokens.hidden}, the model's is {shard.spec.hidden_size}"
        )


def _check_held(shard: ExpertShard, ids: np.ndarray, local: np.ndarray) -> None:
    """Raises when a slot's id is neither -1 nor held here (local: `shard.local_ids_host`)."""
    unheld = shard.unheld_slot(ids, local)
    if unheld is not None:
        token, slot = unheld
        raise _invalid(
            f"expert_ids[{token}, {slot}] = {int(ids[token, slot])} is not held by this worker "
            f"(it holds {format_ids(shard.expert_ids)}; -1 marks an empty slot)"
        )


def forward(
    shard: ExpertShard,
    request: expert_pb2.ExpertForwardRequest,
    metrics: WorkerMetrics | None = None,
) -> expert_pb2.ExpertForwardResponse:
    """Runs the shard's experts on request.tokens; one weighted-sum row per token.

    metrics, when given, records the batch once it is answered (not the requests refused)."""
    start = time.perf_counter()
    out = compute(shard, request)
    result = tf.encode_result(out.rows, request.result_format)  # waits for the device
    settle(shard, out)
    seconds = time.perf_counter() - start
    if metrics is not None:
        metrics.record_batch(out.num_tokens, out.expert_tokens, seconds)
    return expert_pb2.ExpertForwardResponse(result=result, compute_seconds=seconds)


@dataclass
class Computed:
    """A request's experts, launched: valid only once `settle` has passed it."""

    rows: torch.Tensor  # [T, H] float32 on the shard's device: the weighted expert sums
    num_tokens: int
    expert_tokens: int  # (token, expert) pairs computed
    plan: RoutePlan
    tokens: tuple[torch.Tensor, torch.Tensor | None]  # (x, scales) as decoded, on the device
    nonfinite: torch.Tensor | None  # [1] bool on the GPU: NaN in x's data; None: checked


def compute(shard: ExpertShard, request, in_place: bool = False) -> Computed:
    """The checks and the experts of `forward`, without encoding the result. request: an
    ExpertForwardRequest, or anything that reads like one (`moe_core.wire.ForwardRequestView`).
    in_place: its token bytes are in (pinned) host memory that stays put until `settle`.

    On a GPU the finite check of the tokens stays on the device, next to the experts, so that
    the call synchronizes once (for its result): `settle` reads it."""
    _check_layer(shard, request.layer)
    if not request.HasField("tokens"):
        raise _invalid("the request carries no tokens")
    _check_tokens(shard, request.tokens)
    if request.result_format not in (tf.FP32, tf.BF16):
        raise _invalid(
            f"result_format {tf.format_name(request.result_format)} is not one of "
            "TOKEN_FORMAT_FP32, TOKEN_FORMAT_BF16"
        )
    if not 1 <= request.slots <= shard.spec.num_experts:
        raise _invalid(
            f"slots must be in 1..{shard.spec.num_experts} (the model's experts), "
            f"got {request.slots}"
        )
    num_tokens, slots = request.tokens.num_tokens, request.slots
    device = shard.device
    try:
        data, scales = tf.host_tokens(request.tokens)  # views of the request's bytes
        routing = (request.expert_ids, request.expert_weights, num_tokens, slots)
        ids, weights = tf.host_routing(*routing)  # [T, S] int32, float32
    except tf.WireFormatError as err:
        raise _invalid(str(err)) from err
    local = shard.local_ids_host(ids)  # [T, S], -1 = empty slot or not held
    _check_held(shard, ids, local)
    bad = (ids != -1) & ~np.isfinite(weights)
    if bad.any():
        token, slot = (int(i) for i in np.argwhere(bad)[0])
        raise _invalid(
            f"expert_weights[{token}, {slot}] = {float(weights[token, slot])} is not finite"
        )
    plan = shard.group_rows(local, weights)  # empty slots are ignored whatever they carry
    host = [data] if scales is None else [data, scales]
    if in_place:  # in pinned host memory that stays put until `settle`: no copy
        pin = device.type == "cuda"
        tokens = [torch.from_numpy(a).to(device, non_blocking=pin) for a in host]
        staged = staging.to_device(plan.arrays(), device)
    else:  # the tokens and the plan go to the device in one transfer
        staged = staging.to_device(host + plan.arrays(), device)
        tokens, staged = staged[: len(host)], staged[len(host) :]
    x = tokens[0].view(tf.token_dtype(request.tokens.format))  # [T, H]
    x_scales = tokens[1] if scales is not None else None  # [T, ceil(H/128)] float32
    route = plan.on(staged)
    nonfinite = None
    try:
        if device.type != "cuda":
            tf.require_finite(x, "tokens")
            if x_scales is not None:
                tf.require_finite(x_scales, "tokens (FP8 scales)")
        elif scales is not None and not np.isfinite(scales).all():  # a refusal: the message
            tf.require_finite(x, "tokens")  # names the first bad value, data first
            tf.require_finite(x_scales, "tokens (FP8 scales)")
        else:  # the data's check stays on the device; `settle` reads it
            nonfinite = tf.nonfinite(x).any().reshape(1)  # [1] bool
    except tf.WireFormatError as err:
        raise _invalid(str(err)) from err
    try:
        out = shard.run(request.layer, x, x_scales, route)
    except ValueError as err:
        raise _invalid(str(err)) from err
    except torch.OutOfMemoryError as err:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"out of memory running {num_tokens} tokens on {device}: {err}",
        ) from err
    return Computed(out, num_tokens, plan.tokens.size, route, (x, x_scales), nonfinite)


def settle(shard: ExpertShard, done: Computed, nonfinite: torch.Tensor | None = None) -> None:
    """Refuses the request if its tokens were not finite (INVALID_ARGUMENT), else counts its
    rows into the shard's expert load. Call it after the device has finished the request's
    work; nonfinite: `done.nonfinite` already copied to the host, if it was."""
    flags = done.nonfinite if nonfinite is None else nonfinite
    if flags is not None and bool(flags.any()):
        x, scales = done.tokens
        try:
            tf.require_finite(x, "tokens")
            if scales is not None:
                tf.require_finite(scales, "tokens (FP8 scales)")
        except tf.WireFormatError as err:
            raise _invalid(str(err)) from err
    shard.record_load(done.plan)


def worker_info(shard: ExpertShard) -> expert_pb2.WorkerInfo:
    """Describes the shard: model, held experts, precision, memory and per-expert token counts."""
    spec = shard.spec
    return expert_pb2.WorkerInfo(
        model_type=spec.model_type,
        expert_ids=sorted(shard.expert_ids),
        moe_layers=list(spec.moe_layers),
        hidden_size=spec.hidden_size,
        num_experts=spec.num_experts,
        precision=str(shard.precision),
        device=str(shard.device),
        resident_weight_bytes=shard.resident_bytes(),
        expert_tokens=dict(shard.expert_load()),
    )
