"""The interface between an MoE layer and whoever runs its routed experts.

The layer calls `dispatch` with its tokens and routing, computes its shared experts, then calls
`combine`: a remote backend (router.dispatch) overlaps the two; `LocalExpertBackend` runs the
experts in process on one `ExpertShard` that holds all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moe_core.fp8 import quantize_tokens
from moe_core.grpc_server import format_ids
from moe_core.precision import Precision
from router.profiler import StepProfiler, timed

if TYPE_CHECKING:
    from expert_worker.experts import ExpertShard


class ExpertsUnavailableError(RuntimeError):
    """No live worker serves some experts that tokens chose (a backend's FAIL policy)."""

    def __init__(self, layer: int, experts: list[int], rows: torch.Tensor) -> None:
        super().__init__(
            f"no expert worker serves experts {format_ids(experts)} (layer {layer}): their "
            "workers are down and no replica is left"
        )
        self.layer = layer
        self.experts = experts
        self.rows = rows  # [n] int64 token rows of the dispatched x that chose them

    def shifted(self, offset: int) -> ExpertsUnavailableError:
        """The same error with rows counted from `offset` (a micro-batch's place in its step)."""
        return ExpertsUnavailableError(self.layer, self.experts, self.rows + offset)


class ExpertBackend(Protocol):
    # Not None: `dispatch` also takes `staged=`, x already in this precision's wire format on
    # the host (router.dispatch.WireTokens), and topk_ids/weights on the host; the decode graphs
    # write them there. None: the backend takes x and its top-k where they are.
    staged_precision: Precision | None

    def dispatch(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> Any:
        """x [T, H] (model dtype), topk_ids [T, k] int64 global expert ids, topk_weights [T, k]
        float32 -> a handle."""

    def combine(self, handle: Any) -> torch.Tensor:
        """-> [T, H] float32: sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t])."""

    def take_dropped(self) -> dict[int, set[int]]:
        """Experts left out of each token row's top-k since the last call (token row of the
        dispatched x -> global expert ids); empty when every chosen expert ran."""

    def take_wait_seconds(self) -> float:
        """Seconds `combine` spent waiting for experts computed elsewhere since the last call."""


@dataclass
class _LocalHandle:
    layer: int
    x: torch.Tensor  # [T, H] in the shard's token format
    x_scales: torch.Tensor | None  # [T, ceil(H/128)] float32 for fp8
    topk_ids: torch.Tensor  # [T, k] int64
    topk_weights: torch.Tensor  # [T, k] float32
    device: torch.device  # where the caller wants the result


class LocalExpertBackend:
    """In-process experts: tokens take the shard's precision exactly as on the wire."""

    staged_precision = None  # the tokens stay on the device

    def __init__(self, shard: ExpertShard) -> None:
        missing = set(range(shard.spec.num_experts)) - set(shard.expert_ids)
        if missing:
            raise ValueError(
                f"a local backend needs every expert; the shard lacks {len(missing)} of "
                f"{shard.spec.num_experts}"
            )
        self.shard = shard
        self.profiler: StepProfiler | None = None  # times the experts as phase "experts"

    def dispatch(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> _LocalHandle:
        device, caller = self.shard.device, x.device
        scales = None
        if self.shard.precision == Precision.FP8:
            x, scales = quantize_tokens(x.to(device))
        elif self.shard.precision == Precision.BF16:
            x = x.to(device, torch.bfloat16)
        else:
            x = x.to(device, torch.float32)
        ids, weights = topk_ids.to(device), topk_weights.to(device, torch.float32)
        return _LocalHandle(layer, x, scales, ids, weights, caller)

    def combine(self, handle: _LocalHandle) -> torch.Tensor:
        with timed(self.profiler, "experts"):
            out = self.shard.forward(
                handle.layer, handle.x, handle.x_scales, handle.topk_ids, handle.topk_weights
            )
        return out.to(handle.device)  # [T, H] float32

    def take_dropped(self) -> dict[int, set[int]]:
        return {}  # every expert is here

    def take_wait_seconds(self) -> float:
        return 0.0  # computed in the caller's thread: nothing to overlap
