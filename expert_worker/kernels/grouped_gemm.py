"""FP8 block-scaled grouped GEMM entry points (kernels: grouped_gemm.cu, grouped_gemm_tma.cu).

Layout shared by every entry here: rows of `a8` are sorted by group; group g owns
`group_counts[g]` consecutive rows (zero allowed) and multiplies them by `b8[g]`. The sum of
`group_counts` must equal the number of rows (not checked: it would need a device sync).
"""

from __future__ import annotations

import ctypes

import torch

from moe_core.fp8 import BLOCK, FP8_DTYPE

from .nvrtc import load_kernel, sm_count, tensor_map_2d

SOURCE = "grouped_gemm.cu"  # v1 (mma.sync) and v2 (wgmma, cp.async)
KERNEL = "grouped_gemm_fp8"
SOURCE_TMA = "grouped_gemm_tma.cu"  # v3 (TMA, warp-specialised wgmma, persistent)
KERNEL_TMA = "grouped_gemm_fp8_tma"

# Epilogues of grouped_gemm.cu.
EPI_BF16 = 0  # C as bf16 [M, N]
EPI_SWIGLU_QUANT = 1  # silu(gate) * up, re-quantized per row per 128 channels
EPI_WEIGHTED_ADD = 2  # out[row_token[r]] += row_weight[r] * C[r] in float32

# Tile configurations: CTA tile BM x BN, warps WM x WN, cp.async stages; WGMMA=1 uses the Hopper
# warpgroup MMA (one warpgroup per 64 rows), otherwise mma.sync m16n8k32 (any sm_89+ GPU).
# TMA=1 configurations run grouped_gemm_tma.cu (v3, sm_90a): BM / 64 consumer warpgroups plus a
# producer warpgroup, a TMA ring of STAGES stages, a persistent grid of at most one CTA per SM.
# MCAST=2: clusters of two CTAs share a tile by TMA multicast: the A tile (two adjacent N tiles,
# suffix x2) or, MCAST_B=1, the B tile (two adjacent M tiles of one group, suffix b2).
# CHUNK=64 (suffix c64): each consumer warpgroup runs software-pipelined wgmma m64n64k32 chunks
# with two partial sets, so its promotions overlap its own next chunk (grouped_gemm_tma.cu).
# AREG=1 (suffix ar): each consumer warp loads its rows of A into registers once per k-block and
# both n128 halves read A from there (wgmma RS form), halving A's shared-memory reads.
# SSMEM=1 (suffix ss): the producer warp stages each k-block's scales in shared memory; with
# either CHUNK (ssc64: staged scales and n64 chunks).
CONFIGS: dict[str, dict[str, int]] = {
    "tma128n256b2": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=2, MCAST_B=1),
    "tma128n256x2": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=2),
    "tma128n256": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1),
    "tma128n256c64": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, CHUNK=64),
    "tma128n256ar": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, AREG=1),
    "tma128n256ss": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, SSMEM=1),
    "tma128n256ssc64": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, SSMEM=1, CHUNK=64),
    "tma128": dict(TMA=1, BM=128, BN=128, STAGES=6, MCAST=1),
    "wg128": dict(WGMMA=1, BM=128, BN=128, WM=8, WN=1, STAGES=6),
    "wg128n256": dict(WGMMA=1, BM=128, BN=256, WM=8, WN=1, STAGES=4),
    "wg64": dict(WGMMA=1, BM=64, BN=128, WM=4, WN=1, STAGES=4),
    "m128": dict(BM=128, BN=128, WM=2, WN=4, STAGES=5),
    "m64": dict(BM=64, BN=128, WM=2, WN=4, STAGES=5),
    "m32": dict(BM=32, BN=128, WM=1, WN=4, STAGES=6),
    "m16": dict(BM=16, BN=128, WM=1, WN=4, STAGES=6),
    # SwiGLU epilogue: 128 gate + 128 up columns per CTA.
    "swiglu_tma128b2": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=2, MCAST_B=1),
    "swiglu_tma128x2": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=2),
    "swiglu_tma128": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1),
    "swiglu_tma128c64": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, CHUNK=64),
    "swiglu_tma128ar": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, AREG=1),
    "swiglu_tma128ss": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, SSMEM=1),
    "swiglu_tma128ssc64": dict(TMA=1, BM=128, BN=256, STAGES=4, MCAST=1, SSMEM=1, CHUNK=64),
    "swiglu_wg128": dict(WGMMA=1, BM=128, BN=256, WM=8, WN=1, STAGES=4),
    "swiglu_wg64": dict(WGMMA=1, BM=64, BN=256, WM=4, WN=1, STAGES=4),
    "swiglu_m64": dict(BM=64, BN=256, WM=2, WN=4, STAGES=4),
    "swiglu_m16": dict(BM=16, BN=256, WM=1, WN=8, STAGES=4),
}


# Prefill path of pick_config: "v3" (TMA kernel, scales staged in shared memory) or "v2"
# (cp.async wgmma kernel). SCATTER: the same choice for the weighted scatter-add epilogue.
PREFILL = "v3"
SCATTER = "v2"


def pick_config(
    num_rows: int, num_groups: int, n: int, swiglu: bool = False, scatter: bool = False
) -> str:
    """Small heuristic on the mean rows per group and N (measured on H100, docs/kernels.md).

    Decode (<= 16 rows per group) streams weights with the mma.sync m16 tile; prefill uses the
    v3 TMA kernel (or v2's wgmma with PREFILL = "v2") with the widest N tile that divides N,
    with scales staged in shared memory at BN = 256; the weighted scatter-add epilogue
    (`scatter`, the MLP's down GEMM) takes SCATTER's choice.
    """
    mean_rows = num_rows / max(num_groups, 1)
    v3 = PREFILL == "v3" and (not scatter or SCATTER == "v3")
    if swiglu:
        if mean_rows <= 16:
            return "swiglu_m16"
        return "swiglu_tma128ss" if v3 else "swiglu_wg128"
    if mean_rows <= 16:
        return "m16"
    if mean_rows <= 64:
        return "wg64"
    if n % 256 == 0:
        return "tma128n256ss" if v3 else "wg128n256"
    return "tma128" if v3 else "wg128"  # staged scales measured no faster at BN = 128


def n_tiles_per_cluster(cfg: dict[str, int]) -> int:
    """N tiles that one cluster takes side by side (N / BN must be a multiple of it)."""
    return 1 if cfg.get("MCAST_B") else cfg.get("MCAST", 1)


def threads(cfg: dict[str, int]) -> int:
    if cfg.get("TMA"):
        return (cfg["BM"] // 64 + 1) * 128  # consumer warpgroups + the producer warpgroup
    return cfg["WM"] * cfg["WN"] * 32


def smem_bytes(cfg: dict[str, int]) -> int:
    """Dynamic shared memory of a configuration, plus 1024 bytes to align the swizzle atoms.

    cp.async kernels: stages of (A tile, B tile, row scales). TMA kernel: stages of (A tile,
    B tile) and two mbarriers (full, empty) per stage, and with SSMEM the stage's scales.
    """
    if cfg.get("TMA"):
        staged_scales = (cfg["BM"] + 4) * 4 if cfg.get("SSMEM") else 0  # SCALE_SLOT floats
        return cfg["STAGES"] * ((cfg["BM"] + cfg["BN"]) * BLOCK + 16 + staged_scales) + 1024
    return cfg["STAGES"] * ((cfg["BM"] + cfg["BN"]) * BLOCK + cfg["BM"] * 4) + 1024


def _check_operands(a8, a_scales, b8, b_scales, group_counts) -> tuple[int, int, int, int]:
    """Assert the operand contract; return (M, N, K, G)."""
    assert a8.is_cuda, f"a8 must be on a CUDA device, got {a8.device}"
    dev = a8.device
    assert a8.dtype == FP8_DTYPE, f"a8 must be float8_e4m3fn, got {a8.dtype}"
    assert a8.dim() == 2, f"a8 must be [M, K], got shape {tuple(a8.shape)}"
    m, k = a8.shape
    assert k % BLOCK == 0 and k > 0, f"K must be a positive multiple of {BLOCK}, got {k}"
    assert b8.dtype == FP8_DTYPE, f"b8 must be float8_e4m3fn, got {b8.dtype}"
    assert b8.dim() == 3, f"b8 must be [G, N, K], got shape {tuple(b8.shape)}"
    g, n, kb = b8.shape
    assert kb == k, f"b8 K ({kb}) must equal a8 K ({k})"
    assert n % BLOCK == 0 and n > 0, f"N must be a positive multiple of {BLOCK}, got {n}"
    assert tuple(a_scales.shape) == (m, k // BLOCK), (
        f"a_scales must be [M, K/128] = {(m, k // BLOCK)}, got {tuple(a_scales.shape)}"
    )
    assert tuple(b_scales.shape) == (g, n // BLOCK, k // BLOCK), (
        f"b_scales must be [G, N/128, K/128] = {(g, n // BLOCK, k // BLOCK)}, "
        f"got {tuple(b_scales.shape)}"
    )
    assert a_scales.dtype == torch.float32, f"a_scales must be float32, got {a_scales.dtype}"
    assert b_scales.dtype == torch.float32, f"b_scales must be float32, got {b_scales.dtype}"
    assert tuple(group_counts.shape) == (g,), (
        f"group_counts must be [G] = [{g}], got {tuple(group_counts.shape)}"
    )
    assert group_counts.dtype == torch.int32, (
        f"group_counts must be int32, got {group_counts.dtype}"
    )
    for name, t in (
        ("a8", a8),
        ("a_scales", a_scales),
        ("b8", b8),
        ("b_scales", b_scales),
        ("group_counts", group_counts),
    ):
        assert t.device == dev, f"{name} is on {t.device}, expected {dev}"
        assert t.is_contiguous(), f"{name} must be contiguous"
    assert a8.data_ptr() % 16 == 0 and b8.data_ptr() % 16 == 0, "a8 and b8 must be 16-byte aligned"
    return m, n, k, g


def launch(
    epilogue: int,
    cfg_name: str,
    a8: torch.Tensor,
    a_scales: torch.Tensor,
    b8: torch.Tensor,
    b_scales: torch.Tensor,
    group_counts: torch.Tensor,
    out: torch.Tensor,
    out_scales: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
    row_token: torch.Tensor | None = None,
    max_ctas: int | None = None,
) -> None:
    """Launch one kernel with one epilogue; operands already checked by the caller.

    `max_ctas` caps the persistent grid of TMA configurations (default: as many CTAs as fit,
    one per SM).
    """
    m, k = a8.shape
    g, n, _ = b8.shape
    if m == 0:
        return
    cfg = CONFIGS[cfg_name]
    if epilogue == EPI_SWIGLU_QUANT:
        assert cfg["BN"] == 256, f"config {cfg_name} is not a SwiGLU config"
    n_tiles = n // (256 if epilogue == EPI_SWIGLU_QUANT else cfg["BN"])
    assert n % cfg["BN"] == 0, f"N={n} is not a multiple of the tile width {cfg['BN']}"
    # Upper bound on M tiles of the ragged layout: each group adds at most one partial tile.
    m_tiles = (m + cfg["BM"] - 1) // cfg["BM"] + g
    scalars = [ctypes.c_int(m), ctypes.c_int(n), ctypes.c_int(k), ctypes.c_int(g)]
    rest = [group_counts, out, out_scales, row_weights, row_token, *scalars]
    defines = dict(cfg, EPI=epilogue)
    if cfg.get("TMA"):
        kernel = load_kernel(SOURCE_TMA, KERNEL_TMA, defines, a8.device)
        cluster, side = cfg["MCAST"], n_tiles_per_cluster(cfg)
        assert n_tiles % side == 0, f"{cfg_name} needs a multiple of {side} N tiles, N={n}"
        if cfg.get("MCAST_B"):  # a cluster takes a super-tile of `cluster` M tiles
            units = ((m + cluster * cfg["BM"] - 1) // (cluster * cfg["BM"]) + g) * n_tiles
        else:
            units = m_tiles * n_tiles // side
        map_a = tensor_map_2d(a8, m, k, cfg["BM"] // side)  # sharing A: each CTA loads its half
        map_b = tensor_map_2d(b8, g * n, k, 128)
        if cluster > 1:
            fit = kernel.max_active_clusters(cluster, threads(cfg), smem_bytes(cfg))
        else:
            fit = sm_count(a8.device.index)
        clusters = min(units, fit if max_ctas is None else max(1, max_ctas // cluster))
        args = [map_a, map_b, a_scales, b_scales, *rest]
        kernel(clusters * cluster, threads(cfg), smem_bytes(cfg), args)
    else:
        kernel = load_kernel(SOURCE, KERNEL, defines, a8.device)
        args = [a8, a_scales, b8, b_scales, *rest]
        kernel(m_tiles * n_tiles, threads(cfg), smem_bytes(cfg), args)


def grouped_gemm_fp8(
    a8: torch.Tensor,
    a_scales: torch.Tensor,
    b8: torch.Tensor,
    b_scales: torch.Tensor,
    group_counts: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: str | None = None,
) -> torch.Tensor:
    """Grouped C[r] = A[r] @ B[g(r)]^T on the block-dequantized operands, fp32 accumulation.

    a8 [M, K] float8_e4m3fn, a_scales [M, K/128] float32 (per row per 128 channels),
    b8 [G, N, K] float8_e4m3fn, b_scales [G, N/128, K/128] float32 (per 128x128 block),
    group_counts [G] int32 (sum == M, zeros allowed) -> [M, N] bfloat16.
    `out` (optional, [M, N] bfloat16) receives the result; `config` names an entry of CONFIGS.
    """
    m, n, k, g = _check_operands(a8, a_scales, b8, b_scales, group_counts)
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16, device=a8.device)
    assert out.dtype == torch.bfloat16 and tuple(out.shape) == (m, n) and out.is_contiguous(), (
        f"out must be a contiguous bfloat16 [M, N] = {(m, n)}, got {out.dtype} {tuple(out.shape)}"
    )
    cfg = config or pick_config(m, g, n)
    launch(EPI_BF16, cfg, a8, a_scales, b8, b_scales, group_counts, out)
    return out
