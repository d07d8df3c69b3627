"""`ExpertShard`: the routed experts one worker holds, kept per precision, and their grouped MLP.

Shapes: T = tokens, S = expert slots per token, H = hidden, I = expert intermediate size (fp8
pads it up to a multiple of 128 with zero rows and columns, which leaves the function unchanged),
n = experts held, R = (token, slot) pairs that name a held expert.

Every precision keeps one layout per layer: w13 [n, 2I, H] (gate rows, then up rows) and
w2 [n, H, I]. fp32 keeps float32 weights (FP8 checkpoints dequantized); bf16 keeps bfloat16 and
computes in float32 on CPU, bfloat16 on CUDA; fp8 keeps float8_e4m3fn weights with 128x128 block
scales (the checkpoint's own when it has them) and runs `expert_worker.kernels`: the fused CUDA
kernels (`expert_mlp_fp8`) on a GPU, their torch twin (`expert_mlp_torch`) elsewhere. Both
compute the GEMMs on dequantized operands with float32 accumulation and re-quantize
silu(gate) * up per token per 128 channels before the down projection.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from expert_worker import kernels, staging
from moe_core.checkpoint import Checkpoint
from moe_core.fp8 import BLOCK, FP8_DTYPE, num_blocks, quantize_weight
from moe_core.naming import load_expert, load_expert_fp8
from moe_core.precision import Precision
from moe_core.spec import ModelSpec

log = logging.getLogger(__name__)

_STORAGE = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP8: FP8_DTYPE}


KERNELS = ("auto", "cuda", "torch")  # expert MLP implementations for fp8; auto = cuda on a GPU


@dataclass
class LayerExperts:
    """The held experts of one layer, stacked in the order of `ExpertShard.expert_ids`."""

    w13: torch.Tensor  # [n, 2I, H] float32 | bfloat16 | float8_e4m3fn: gate rows, then up rows
    w2: torch.Tensor  # [n, H, I]
    w13_scales: torch.Tensor | None = None  # fp8: [n, 2I/128, ceil(H/128)] float32
    w2_scales: torch.Tensor | None = None  # fp8: [n, ceil(H/128), I/128] float32

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w13, self.w2, self.w13_scales, self.w2_scales) if t is not None]


@dataclass
class HostPlan:
    """The (token, slot) pairs of one forward that name a held expert, R of them, grouped by
    expert in the order of `ExpertShard.expert_ids`, on the host (numpy)."""

    tokens: np.ndarray  # [R] int64: the token of each row
    row_weights: np.ndarray  # [R] float32: its routing weight
    rows_per_expert: np.ndarray  # [n] int32

    def arrays(self) -> list[np.ndarray]:
        return [self.tokens, self.row_weights, self.rows_per_expert]

    def on(self, tensors: list[torch.Tensor]) -> RoutePlan:
        """The plan over `arrays()` moved to a device (`staging.to_device`, same order)."""
        tokens, row_weights, rows_per_expert = tensors
        return RoutePlan(tokens, row_weights, rows_per_expert, self.rows_per_expert.tolist())


@dataclass
class RoutePlan:
    """The (token, slot) pairs of one forward that name a held expert, R of them, grouped by
    expert in the order of `ExpertShard.expert_ids`; tensors on the tokens' device."""

    tokens: torch.Tensor  # [R] int64: the token of each row
    row_weights: torch.Tensor  # [R] float32: its routing weight
    rows_per_expert: torch.Tensor  # [n] int32 (int64 when planned on the device)
    counts: list[int]  # rows_per_expert on the host


def stored_intermediate(spec: ModelSpec, precision: Precision) -> int:
    """I as stored: fp8 rounds it up to whole 128-blocks so gate and up blocks stay apart."""
    inter = spec.moe_intermediate_size
    return num_blocks(inter) * BLOCK if precision == Precision.FP8 else inter


class ExpertShard:
    def __init__(
        self,
        spec: ModelSpec,
        expert_ids: Sequence[int],
        precision: Precision,
        device: torch.device,
        layers: dict[int, LayerExperts],
        kernels: str = "auto",
    ) -> None:
        self.spec = spec
        self.expert_ids = tuple(expert_ids)
        self.precision = Precision(precision)
        self.device = torch.device(device)
        self.layers = layers
        self.kernels = _pick_kernels(kernels, self.precision, self.device, spec.hidden_size)
        local = torch.full((spec.num_experts,), -1, dtype=torch.int64)  # global -> local
        local[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self._local, self._local_np = local.to(self.device), local.numpy()
        self._tokens = [0] * len(self.expert_ids)  # tokens routed to each held expert

    @classmethod
    def load(
        cls,
        model_dir,
        expert_ids: Sequence[int],
        precision: Precision,
        device="cpu",
        progress: bool = True,
        kernels: str = "auto",
    ) -> ExpertShard:
        """Reads only the held experts' tensors of every MoE layer.

        kernels (fp8 only): "cuda" runs the fused CUDA kernels, "torch" their torch twin, "auto"
        the kernels on a GPU when the hidden size is a multiple of 128, else the twin."""
        spec = ModelSpec.from_dir(model_dir)
        ids = sorted(int(e) for e in expert_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"expert ids must be unique and non-empty, got {list(expert_ids)}")
        if ids[0] < 0 or ids[-1] >= spec.num_experts:
            raise ValueError(f"expert ids must be in [0, {spec.num_experts}), got {ids}")
        precision, device = Precision(precision), torch.device(device)
        _pick_kernels(kernels, precision, device, spec.hidden_size)  # fail before reading weights
        ckpt = Checkpoint(model_dir)
        total = len(spec.moe_layers) * len(ids)
        bar = _Progress(total, f"experts of {os.fspath(model_dir)}", progress)
        layers = {}
        for layer in spec.moe_layers:
            layers[layer] = _empty_layer(spec, len(ids), precision, device)
            for i, expert in enumerate(ids):
                parts = _expert_tensors(ckpt, spec, layer, expert, precision, device)
                _store_expert(layers[layer], i, parts)
                bar.update()
        bar.close()
        return cls(spec, ids, precision, device, layers, kernels)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.layers.values() for t in w.tensors())

    def expert_load(self) -> dict[int, int]:
        return dict(zip(self.expert_ids, self._tokens, strict=True))

    def forward(
        self,
        layer: int,
        x: torch.Tensor,
        x_scales: torch.Tensor | None,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, H]: float32 (fp32), bfloat16 (bf16) or float8_e4m3fn with x_scales
        [T, ceil(H/128)] float32 (fp8); expert_ids [T, S] int64 global ids held here, -1 = empty
        slot; weights [T, S] float32 -> [T, H] float32 = sum over valid slots of
        weight * expert_mlp(x[t]). Raises ValueError on an id not held or a bad shape/dtype.

        expert_ids and weights may be on the CPU (a worker's come from the wire): the routing
        plan is then made there and moved to the device without a synchronization. The tokens
        routed to each expert are counted (`expert_load`)."""
        plan = self.plan(expert_ids, weights, x.shape[0], x.device)
        out = self.run(layer, x, x_scales, plan)  # checks the layer and the tokens
        self.record_load(plan)
        return out

    def plan(
        self, expert_ids: torch.Tensor, weights: torch.Tensor, num_tokens: int, device: torch.device
    ) -> RoutePlan:
        """The rows of `forward`, grouped by held expert; ValueError on an id not held here.
        ids and weights on the CPU: planned there (numpy), moved in one transfer, no sync."""
        if expert_ids.device.type == "cpu":
            self._check_routing(expert_ids, weights, num_tokens)
            host = self.plan_host(expert_ids.numpy(), weights.float().numpy())
            return host.on(staging.to_device(host.arrays(), torch.device(device)))
        local = self._local_ids(expert_ids, weights, num_tokens)  # [T, S], -1 = empty
        tok, slot = (local >= 0).nonzero(as_tuple=True)  # [R], [R]
        experts = local[tok, slot]  # [R]
        order = torch.argsort(experts, stable=True)  # group rows by expert
        tok, experts = tok[order], experts[order]
        row_weights = weights[tok, slot[order]].float()  # [R]
        bins = torch.bincount(experts, minlength=len(self.expert_ids))  # [n] rows per expert
        return RoutePlan(tok, row_weights, bins, bins.tolist())

    def local_ids_host(self, ids: np.ndarray) -> np.ndarray:
        """ids [T, S] integer global ids (numpy) -> [T, S] int64 local ids, -1 where the slot is
        empty or names an expert not held here."""
        num_experts = self.spec.num_experts
        in_range = (ids >= 0) & (ids < num_experts)
        return np.where(in_range, self._local_np[np.clip(ids, 0, num_experts - 1)], -1)

    @staticmethod
    def unheld_slot(ids: np.ndarray, local: np.ndarray) -> tuple[int, int] | None:
        """The first (token, slot) whose id is neither -1 nor held (local: `local_ids_host`)."""
        bad = (ids != -1) & (local < 0)
        return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None

    def plan_host(self, ids: np.ndarray, weights: np.ndarray) -> HostPlan:
        """ids [T, S] integer global ids (-1 = empty slot), weights [T, S] float32 (numpy) ->
        the rows of `forward` on the host; ValueError on an id not held here."""
        local = self.local_ids_host(ids)
        unheld = self.unheld_slot(ids, local)
        if unheld is not None:
            token, slot = unheld
            raise ValueError(
                f"expert_ids[{token}, {slot}] = {int(ids[token, slot])} is not held by this shard"
            )
        return self.group_rows(local, weights)

    def group_rows(self, local: np.ndarray, weights: np.ndarray) -> HostPlan:
        """local [T, S] local ids (-1 = no held expert), weights [T, S] float32 -> the plan."""
        tok, slot = np.nonzero(local >= 0)  # [R] token-major, as torch's nonzero
        experts = local[tok, slot]  # [R]
        order = np.argsort(experts, kind="stable")  # group rows by expert
        tok, slot = tok[order], slot[order]
        bins = np.bincount(experts, minlength=len(self.expert_ids)).astype(np.int32)  # [n]
        return HostPlan(tok.astype(np.int64), weights[tok, slot].astype(np.float32), bins)

    def record_load(self, plan: RoutePlan) -> None:
        """Counts the plan's rows into `expert_load` (a request refused after its compute
        is not counted)."""
        for i, count in enumerate(plan.counts):
            self._tokens[i] += count

    def run(
        self, layer: int, x: torch.Tensor, x_scales: torch.Tensor | None, plan: RoutePlan
    ) -> torch.Tensor:
        """The experts of `forward` on a plan made for x: [T, H] float32; no synchronization."""
        self._check_inputs(layer, x, x_scales)
        tok, row_weights, bins = plan.tokens, plan.row_weights, plan.rows_per_expert
        w = self.layers[layer]
        if self.precision == Precision.FP8:
            run = kernels.expert_mlp_fp8 if self.kernels == "cuda" else kernels.expert_mlp_torch
            return run(
                x[tok].contiguous(),  # [R, H] float8_e4m3fn, rows grouped by expert
                x_scales[tok].contiguous(),  # [R, ceil(H/128)] float32
                bins.to(torch.int32),  # [n], already on the device
                w.w13,
                w.w13_scales,
                w.w2,
                w.w2_scales,
                row_weights.contiguous(),
                tok.contiguous(),
                x.shape[0],
            )
        compute = w.w13.dtype if self.device.type == "cuda" else torch.float32
        xs = x.to(compute)  # [T, H]
        out = torch.zeros(x.shape[0], self.spec.hidden_size, dtype=torch.float32, device=x.device)
        inter = w.w2.shape[2]
        start = 0
        for i, count in enumerate(plan.counts):
            if count == 0:
                continue
            rows = tok[start : start + count]  # [r] tokens routed to expert i
            w13, w2 = w.w13[i].to(compute), w.w2[i].to(compute)  # [2I, H], [H, I]
            gate_up = F.linear(xs[rows], w13)  # [r, 2I]
            h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [r, I]
            y = F.linear(h, w2).float()  # [r, H]
            out.index_add_(0, rows, y * row_weights[start : start + count, None])
            start += count
        return out

    def _check_inputs(self, layer: int, x: torch.Tensor, x_scales: torch.Tensor | None) -> None:
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer ({self.spec.moe_layers})")
        expected = _STORAGE[self.precision]
        if x.dim() != 2 or x.shape[1] != self.spec.hidden_size:
            raise ValueError(f"x must be [T, {self.spec.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != expected:
            raise ValueError(
                f"{self.precision.value} experts take {expected} tokens, got {x.dtype}"
            )
        scales_shape = (x.shape[0], num_blocks(x.shape[1]))
        if self.precision == Precision.FP8 and (
            x_scales is None or tuple(x_scales.shape) != scales_shape
        ):
            shape = None if x_scales is None else tuple(x_scales.shape)
            raise ValueError(f"fp8 tokens need x_scales {list(scales_shape)}, got {shape}")

    def _check_routing(self, ids: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> None:
        if ids.dim() != 2 or ids.shape[0] != num_tokens or weights.shape != ids.shape:
            raise ValueError(
                f"expert_ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be "
                f"[{num_tokens}, S]"
            )

    def _local_ids(self, ids: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        self._check_routing(ids, weights, num_tokens)
        ids = ids.long()
        used = ids != -1
        in_range = (ids >= 0) & (ids < self.spec.num_experts)
        local = torch.where(in_range, self._local[ids.clamp(0, self.spec.num_experts - 1)], -1)
        bad = used & (local < 0)
        if bool(bad.any()):
            token, slot = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"expert_ids[{token}, {slot}] = {int(ids[token, slot])} is not held by this shard"
            )
        return local


def _empty_layer(spec: ModelSpec, n: int, precision: Precision, device) -> LayerExperts:
    inter, hidden = stored_intermediate(spec, precision), spec.hidden_size
    dtype = _STORAGE[precision]

    def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.zeros(shape, dtype=dt, device=device)  # padding must read as zero

    layer = LayerExperts(w13=zeros(n, 2 * inter, hidden), w2=zeros(n, hidden, inter))
    if precision == Precision.FP8:
        ib, hb = inter // BLOCK, num_blocks(hidden)
        layer.w13_scales = zeros(n, 2 * ib, hb, dt=torch.float32)
        layer.w2_scales = zeros(n, hb, ib, dt=torch.float32)
    return layer


def _store_expert(layer: LayerExperts, i: int, parts: dict[str, torch.Tensor]) -> None:
    """Copies one expert's gate/up/down (and their block scales) into slot i of the stacks."""
    inter = layer.w2.shape[2]  # I as stored
    rows = parts["gate"].shape[0]  # the checkpoint's I
    layer.w13[i, :rows].copy_(parts["gate"])
    layer.w13[i, inter : inter + rows].copy_(parts["up"])
    layer.w2[i, :, :rows].copy_(parts["down"])
    if layer.w13_scales is not None:  # I pads to whole blocks, so block rows line up
        blocks = parts["gate_scales"].shape[0]
        layer.w13_scales[i, :blocks].copy_(parts["gate_scales"])
        layer.w13_scales[i, inter // BLOCK : inter // BLOCK + blocks].copy_(parts["up_scales"])
        layer.w2_scales[i, :, :blocks].copy_(parts["down_scales"])


def _pick_kernels(kernels: str, precision: Precision, device: torch.device, hidden: int) -> str:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "cuda" and (device.type != "cuda" or precision != Precision.FP8):
        raise ValueError("the CUDA expert kernels need --device cuda and --precision fp8")
    if kernels == "cuda" and hidden % BLOCK:
        raise ValueError(f"the CUDA expert kernels need a hidden size divisible by {BLOCK}")
    if kernels == "auto":
        return "cuda" if device.type == "cuda" and hidden % BLOCK == 0 else "torch"
    return kernels


def _expert_tensors(
    ckpt: Checkpoint,
    spec: ModelSpec,
    layer: int,
    expert: int,
    precision: Precision,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """One expert's tensors in the storage of `precision`, named as `LayerExperts` fields.
    Weights quantized at load are quantized on `device` (a GPU does it ~100x faster)."""
    if precision != Precision.FP8:
        w = load_expert(ckpt, spec, layer, expert)
        return {"gate": w.gate, "up": w.up, "down": w.down}
    raw = load_expert_fp8(ckpt, spec, layer, expert)
    if raw is not None:  # the checkpoint's own FP8 weights and scales
        return vars(raw)
    w = load_expert(ckpt, spec, layer, expert)  # quantize at load
    out = {}
    for part in ("gate", "up", "down"):
        out[part], out[f"{part}_scales"] = quantize_weight(getattr(w, part).to(device))
    return out


class _Progress:
    """A tqdm bar on a terminal; otherwise a log line every 10 % (or nothing when disabled)."""

    def __init__(self, total: int, what: str, enabled: bool) -> None:
        self.total, self.what, self.enabled, self.done, self._logged = total, what, enabled, 0, 0
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc="loading experts", unit="expert")

    def update(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and (
            self.done * 10 // self.total > self._logged or self.done == self.total
        ):
            self._logged = self.done * 10 // self.total
            log.info("loaded %d/%d %s", self.done, self.total, self.what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
