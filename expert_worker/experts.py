"""`ExpertShard`: the routed experts one worker holds, kept per precision, and their grouped MLP.

Shapes: T = tokens, S = expert slots per token, H = hidden, I = expert intermediate size,
n = experts held, R = (token, slot) pairs that name a held expert.

Precisions: fp32 keeps float32 weights (FP8 checkpoints dequantized); bf16 keeps bfloat16 and
computes in float32 on CPU, bfloat16 on CUDA; fp8 keeps float8_e4m3fn weights with 128x128 block
scales (the checkpoint's own when it has them) and computes the dequantized GEMMs in float32,
re-quantizing silu(gate) * up per token per 128 channels before the down projection.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_core.checkpoint import Checkpoint
from moe_core.fp8 import (
    FP8_DTYPE,
    dequantize_tokens,
    dequantize_weight,
    num_blocks,
    quantize_tokens,
    quantize_weight,
)
from moe_core.naming import load_expert, load_expert_fp8
from moe_core.precision import Precision
from moe_core.spec import ModelSpec

log = logging.getLogger(__name__)

_STORAGE = {Precision.FP32: torch.float32, Precision.BF16: torch.bfloat16, Precision.FP8: FP8_DTYPE}


@dataclass
class LayerExperts:
    """The held experts of one layer, stacked in the order of `ExpertShard.expert_ids`."""

    gate: torch.Tensor  # [n, I, H] float32 | bfloat16 | float8_e4m3fn
    up: torch.Tensor  # [n, I, H]
    down: torch.Tensor  # [n, H, I]
    gate_scales: torch.Tensor | None = None  # fp8: [n, ceil(I/128), ceil(H/128)] float32
    up_scales: torch.Tensor | None = None  # fp8: [n, ceil(I/128), ceil(H/128)]
    down_scales: torch.Tensor | None = None  # fp8: [n, ceil(H/128), ceil(I/128)]

    def tensors(self) -> list[torch.Tensor]:
        all_ = [self.gate, self.up, self.down, self.gate_scales, self.up_scales, self.down_scales]
        return [t for t in all_ if t is not None]


class ExpertShard:
    def __init__(
        self,
        spec: ModelSpec,
        expert_ids: Sequence[int],
        precision: Precision,
        device: torch.device,
        layers: dict[int, LayerExperts],
    ) -> None:
        self.spec = spec
        self.expert_ids = tuple(expert_ids)
        self.precision = Precision(precision)
        self.device = torch.device(device)
        self.layers = layers
        self._local = torch.full((spec.num_experts,), -1, dtype=torch.int64)  # global -> local
        self._local[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self._local = self._local.to(self.device)
        self._tokens = [0] * len(self.expert_ids)  # tokens routed to each held expert

    @classmethod
    def load(
        cls,
        model_dir,
        expert_ids: Sequence[int],
        precision: Precision,
        device="cpu",
        progress: bool = True,
    ) -> ExpertShard:
        """Reads only the held experts' tensors of every MoE layer."""
        spec = ModelSpec.from_dir(model_dir)
        ids = sorted(int(e) for e in expert_ids)
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"expert ids must be unique and non-empty, got {list(expert_ids)}")
        if ids[0] < 0 or ids[-1] >= spec.num_experts:
            raise ValueError(f"expert ids must be in [0, {spec.num_experts}), got {ids}")
        precision, device = Precision(precision), torch.device(device)
        ckpt = Checkpoint(model_dir)
        total = len(spec.moe_layers) * len(ids)
        bar = _Progress(total, f"experts of {os.fspath(model_dir)}", progress)
        layers = {}
        for layer in spec.moe_layers:
            layers[layer] = _empty_layer(spec, len(ids), precision, device)
            for i, expert in enumerate(ids):
                for part, tensor in _expert_tensors(ckpt, spec, layer, expert, precision).items():
                    getattr(layers[layer], part)[i].copy_(tensor)
                bar.update()
        bar.close()
        return cls(spec, ids, precision, device, layers)

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
        weight * expert_mlp(x[t]). Raises ValueError on an id not held or a bad shape/dtype."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not an MoE layer ({self.spec.moe_layers})")
        xs = self._tokens_in(x, x_scales)  # [T, H] compute dtype
        local = self._local_ids(expert_ids, weights, x.shape[0])  # [T, S], -1 = empty
        tok, slot = (local >= 0).nonzero(as_tuple=True)  # [R], [R]
        experts = local[tok, slot]  # [R]
        order = torch.argsort(experts, stable=True)  # group rows by expert
        tok, experts = tok[order], experts[order]
        row_weights = weights[tok, slot[order]].float()  # [R]
        counts = torch.bincount(experts, minlength=len(self.expert_ids)).tolist()
        out = torch.zeros(x.shape[0], self.spec.hidden_size, dtype=torch.float32, device=x.device)
        w = self.layers[layer]
        start = 0
        for i, count in enumerate(counts):
            if count == 0:
                continue
            rows = tok[start : start + count]  # [r] tokens routed to expert i
            y = self._mlp(w, i, xs[rows])  # [r, H] float32
            out.index_add_(0, rows, y * row_weights[start : start + count, None])
            self._tokens[i] += count
            start += count
        return out

    def _tokens_in(self, x: torch.Tensor, x_scales: torch.Tensor | None) -> torch.Tensor:
        expected = _STORAGE[self.precision]
        if x.dim() != 2 or x.shape[1] != self.spec.hidden_size:
            raise ValueError(f"x must be [T, {self.spec.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != expected:
            raise ValueError(
                f"{self.precision.value} experts take {expected} tokens, got {x.dtype}"
            )
        if self.precision == Precision.FP8:
            if x_scales is None or tuple(x_scales.shape) != (x.shape[0], num_blocks(x.shape[1])):
                shape = None if x_scales is None else tuple(x_scales.shape)
                expected_shape = [x.shape[0], num_blocks(x.shape[1])]
                raise ValueError(f"fp8 tokens need x_scales {expected_shape}, got {shape}")
            return dequantize_tokens(x, x_scales)
        if self.precision == Precision.BF16 and self.device.type == "cuda":
            return x
        return x.float()

    def _local_ids(self, ids: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[0] != num_tokens or weights.shape != ids.shape:
            raise ValueError(
                f"expert_ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be "
                f"[{num_tokens}, S]"
            )
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

    def _mlp(self, w: LayerExperts, i: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its rows: x [r, H] -> [r, H] float32."""
        if self.precision == Precision.FP8:
            gate = F.linear(x, dequantize_weight(w.gate[i], w.gate_scales[i]))  # [r, I]
            up = F.linear(x, dequantize_weight(w.up[i], w.up_scales[i]))  # [r, I]
            h8, h_scales = quantize_tokens(F.silu(gate) * up)  # the kernel's re-quantization
            h = dequantize_tokens(h8, h_scales)  # [r, I]
            return F.linear(h, dequantize_weight(w.down[i], w.down_scales[i]))  # [r, H]
        gate, up, down = w.gate[i], w.up[i], w.down[i]
        if x.dtype != gate.dtype:
            gate, up, down = gate.to(x.dtype), up.to(x.dtype), down.to(x.dtype)
        h = F.silu(F.linear(x, gate)) * F.linear(x, up)  # [r, I]
        return F.linear(h, down).float()  # [r, H]


def _empty_layer(spec: ModelSpec, n: int, precision: Precision, device) -> LayerExperts:
    inter, hidden = spec.moe_intermediate_size, spec.hidden_size
    dtype = _STORAGE[precision]

    def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dt, device=device)

    layer = LayerExperts(
        gate=empty(n, inter, hidden), up=empty(n, inter, hidden), down=empty(n, hidden, inter)
    )
    if precision == Precision.FP8:
        ib, hb = num_blocks(inter), num_blocks(hidden)
        layer.gate_scales = empty(n, ib, hb, dt=torch.float32)
        layer.up_scales = empty(n, ib, hb, dt=torch.float32)
        layer.down_scales = empty(n, hb, ib, dt=torch.float32)
    return layer


def _expert_tensors(
    ckpt: Checkpoint, spec: ModelSpec, layer: int, expert: int, precision: Precision
) -> dict[str, torch.Tensor]:
    """One expert's tensors in the storage of `precision`, named as `LayerExperts` fields."""
    if precision != Precision.FP8:
        w = load_expert(ckpt, spec, layer, expert)
        return {"gate": w.gate, "up": w.up, "down": w.down}
    raw = load_expert_fp8(ckpt, spec, layer, expert)
    if raw is not None:  # the checkpoint's own FP8 weights and scales
        return vars(raw)
    w = load_expert(ckpt, spec, layer, expert)  # quantize at load
    out = {}
    for part in ("gate", "up", "down"):
        out[part], out[f"{part}_scales"] = quantize_weight(getattr(w, part))
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
