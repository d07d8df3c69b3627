"""The routed-expert MLP of a worker: FP8 CUDA kernels and a pure-torch twin.

For each row r (sorted by local expert g):
    h_r  = silu(x_r @ W_gate[g]^T) * (x_r @ W_up[g]^T)          fp32, on dequantized operands
    h8_r = quantize_tokens(h_r)                                    e4m3, one scale per 128 channels
    y_r  = h8_r @ W_down[g]^T                                      fp32, on dequantized operands
    out[row_token[r]] += row_weights[r] * y_r                      float32 [num_tokens, H]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.fp8 import (
    BLOCK,
    FP8_DTYPE,
    dequantize_tokens,
    dequantize_weight,
    num_blocks,
    quantize_tokens,
)

from .grouped_gemm import (
    EPI_SWIGLU_QUANT,
    EPI_WEIGHTED_ADD,
    _check_operands,
    grouped_gemm_fp8,
    launch,
    pick_config,
)


def _check_routing(m: int, row_weights, row_token, num_tokens: int, device) -> None:
    assert tuple(row_weights.shape) == (m,), (
        f"row_weights must be [M] = [{m}], got {tuple(row_weights.shape)}"
    )
    assert tuple(row_token.shape) == (m,), (
        f"row_token must be [M] = [{m}], got {tuple(row_token.shape)}"
    )
    assert row_weights.dtype == torch.float32, (
        f"row_weights must be float32, got {row_weights.dtype}"
    )
    assert row_token.dtype == torch.int64, f"row_token must be int64, got {row_token.dtype}"
    assert row_weights.device == device and row_token.device == device, (
        f"row_weights ({row_weights.device}) and row_token ({row_token.device}) must be on {device}"
    )
    assert row_weights.is_contiguous() and row_token.is_contiguous(), (
        "row_weights and row_token must be contiguous"
    )
    assert num_tokens >= 0, f"num_tokens must be >= 0, got {num_tokens}"


def _check_mlp(x8, x_scales, group_counts, w13, w13_scales, w2, w2_scales) -> tuple[int, ...]:
    """Assert the expert-MLP contract; return (M, H, I, G)."""
    assert w13.dim() == 3 and w2.dim() == 3, (
        f"w13 must be [G, 2I, H] and w2 [G, H, I], got {tuple(w13.shape)} and {tuple(w2.shape)}"
    )
    m, two_i, h, g = _check_operands(x8, x_scales, w13, w13_scales, group_counts)
    i = two_i // 2
    assert two_i % (2 * BLOCK) == 0, f"w13 rows (2I = {two_i}) must be 2 * a multiple of {BLOCK}"
    assert tuple(w2.shape) == (g, h, i), (
        f"w2 must be [G, H, I] = {(g, h, i)}, got {tuple(w2.shape)}"
    )
    assert w2.dtype == FP8_DTYPE, f"w2 must be float8_e4m3fn, got {w2.dtype}"
    assert tuple(w2_scales.shape) == (g, h // BLOCK, i // BLOCK), (
        f"w2_scales must be [G, H/128, I/128] = {(g, h // BLOCK, i // BLOCK)}, "
        f"got {tuple(w2_scales.shape)}"
    )
    assert w2_scales.dtype == torch.float32, f"w2_scales must be float32, got {w2_scales.dtype}"
    assert w2.device == x8.device and w2_scales.device == x8.device, "w2 must be on x8's device"
    assert w2.is_contiguous() and w2_scales.is_contiguous(), "w2 and w2_scales must be contiguous"
    return m, h, i, g


def swiglu_quant_fp8(
    x8: torch.Tensor,
    x_scales: torch.Tensor,
    group_counts: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    out_scales: torch.Tensor | None = None,
    config: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gate_up GEMM + silu(gate) * up + per-row FP8 quantization (one kernel).

    x8 [M, H] e4m3, x_scales [M, H/128] f32, group_counts [G] int32, w13 [G, 2I, H] e4m3,
    w13_scales [G, 2I/128, H/128] f32 -> (h8 [M, I] float8_e4m3fn, h_scales [M, I/128] float32).
    """
    m, _, _, g = _check_operands(x8, x_scales, w13, w13_scales, group_counts)
    i = w13.shape[1] // 2
    assert w13.shape[1] % (2 * BLOCK) == 0, f"2I = {w13.shape[1]} must be 2 * a multiple of 128"
    if out is None:
        out = torch.empty(m, i, dtype=FP8_DTYPE, device=x8.device)
    if out_scales is None:
        out_scales = torch.empty(m, i // BLOCK, dtype=torch.float32, device=x8.device)
    assert out.dtype == FP8_DTYPE and tuple(out.shape) == (m, i) and out.is_contiguous()
    assert out_scales.dtype == torch.float32 and tuple(out_scales.shape) == (m, i // BLOCK)
    assert out_scales.is_contiguous()
    cfg = config or pick_config(m, g, w13.shape[1], swiglu=True)
    launch(EPI_SWIGLU_QUANT, cfg, x8, x_scales, w13, w13_scales, group_counts, out, out_scales)
    return out, out_scales


def expert_mlp_fp8(
    x8: torch.Tensor,
    x_scales: torch.Tensor,
    group_counts: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    row_weights: torch.Tensor,
    row_token: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """Expert MLP with the CUDA kernels: two launches.

    1. gate_up GEMM with the SwiGLU + FP8 requantization epilogue -> h8 [M, I], scales [M, I/128];
    2. down GEMM whose epilogue adds row_weights[r] * y_r into out[row_token[r]] (fp32 atomics).

    x8 [M, H] float8_e4m3fn (rows sorted by group), x_scales [M, H/128] float32,
    group_counts [G] int32, w13 [G, 2I, H] e4m3, w13_scales [G, 2I/128, H/128] f32,
    w2 [G, H, I] e4m3, w2_scales [G, H/128, I/128] f32, row_weights [M] f32, row_token [M] int64
    -> [num_tokens, H] float32 (zeros for tokens with no rows).
    """
    m, h, _, g = _check_mlp(x8, x_scales, group_counts, w13, w13_scales, w2, w2_scales)
    _check_routing(m, row_weights, row_token, num_tokens, x8.device)
    out = torch.zeros(num_tokens, h, dtype=torch.float32, device=x8.device)
    if m == 0:
        return out
    h8, hs = swiglu_quant_fp8(x8, x_scales, group_counts, w13, w13_scales)
    cfg = pick_config(m, g, h, scatter=True)
    launch(
        EPI_WEIGHTED_ADD, cfg, h8, hs, w2, w2_scales, group_counts, out,
        row_weights=row_weights, row_token=row_token,
    )  # fmt: skip
    return out


def expert_mlp_fp8_unfused(
    x8: torch.Tensor,
    x_scales: torch.Tensor,
    group_counts: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    row_weights: torch.Tensor,
    row_token: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """Same function as expert_mlp_fp8 with the plain GEMM kernel and torch in between.

    gate_up -> bf16 [M, 2I] -> torch SwiGLU + quantize_tokens -> down -> bf16 [M, H] ->
    torch index_add_. Kept to measure what the fused epilogues save.
    """
    m, h, i, g = _check_mlp(x8, x_scales, group_counts, w13, w13_scales, w2, w2_scales)
    _check_routing(m, row_weights, row_token, num_tokens, x8.device)
    out = torch.zeros(num_tokens, h, dtype=torch.float32, device=x8.device)
    if m == 0:
        return out
    gu = grouped_gemm_fp8(x8, x_scales, w13, w13_scales, group_counts).float()
    h8, hs = quantize_tokens(F.silu(gu[:, :i]) * gu[:, i:])
    y = grouped_gemm_fp8(h8, hs, w2, w2_scales, group_counts)
    out.index_add_(0, row_token, y.float() * row_weights[:, None])
    return out


def expert_mlp_torch(
    x8: torch.Tensor,
    x_scales: torch.Tensor,
    group_counts: torch.Tensor,
    w13: torch.Tensor,
    w13_scales: torch.Tensor,
    w2: torch.Tensor,
    w2_scales: torch.Tensor,
    row_weights: torch.Tensor,
    row_token: torch.Tensor,
    num_tokens: int,
) -> torch.Tensor:
    """Pure-torch twin of expert_mlp_fp8 (CPU or CUDA; any H and I, partial blocks allowed).

    Same shapes and dtypes as expert_mlp_fp8, except that H and I need not be multiples of 128
    (scales then have ceil(H/128), ceil(I/128) blocks). Float32 math on dequantized operands.
    """
    assert x8.dim() == 2 and w13.dim() == 3 and w2.dim() == 3, "x8 [M, H], w13, w2 [G, ., .]"
    m, h = x8.shape
    g, two_i, _ = w13.shape
    i = two_i // 2
    assert x8.dtype == FP8_DTYPE and w13.dtype == FP8_DTYPE and w2.dtype == FP8_DTYPE, (
        f"x8, w13, w2 must be float8_e4m3fn, got {x8.dtype}, {w13.dtype}, {w2.dtype}"
    )
    assert tuple(w13.shape) == (g, 2 * i, h), f"w13 must be [G, 2I, H], got {tuple(w13.shape)}"
    assert tuple(w2.shape) == (g, h, i), (
        f"w2 must be [G, H, I] = {(g, h, i)}, got {tuple(w2.shape)}"
    )
    assert tuple(x_scales.shape) == (m, num_blocks(h)), (
        f"x_scales must be [M, ceil(H/128)], got {tuple(x_scales.shape)}"
    )
    assert tuple(group_counts.shape) == (g,), f"group_counts must be [G], got {group_counts.shape}"
    _check_routing(m, row_weights, row_token, num_tokens, x8.device)
    counts = [int(c) for c in group_counts.tolist()]
    assert sum(counts) == m, f"group_counts sum to {sum(counts)}, expected M = {m}"
    out = torch.zeros(num_tokens, h, dtype=torch.float32, device=x8.device)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        rows = slice(start, start + c)
        start += c
        x = dequantize_tokens(x8[rows], x_scales[rows])
        gu = x @ dequantize_weight(w13[e], w13_scales[e]).T
        h8, hs = quantize_tokens(F.silu(gu[:, :i]) * gu[:, i:])
        y = dequantize_tokens(h8, hs) @ dequantize_weight(w2[e], w2_scales[e]).T
        out.index_add_(0, row_token[rows], y * row_weights[rows, None])
    return out
