"""Expert MLP on the GPU (fused kernels, unfused kernels, torch twin) vs a float64 reference.

Tolerance: ||out - ref|| / ||ref|| <= 1e-2. The reference computes both GEMMs in float64 on the
dequantized operands and re-quantizes the intermediate with moe_core.fp8.quantize_tokens.
"""

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings")

from expert_worker.kernels import (  # noqa: E402
    expert_mlp_fp8,
    expert_mlp_fp8_unfused,
    expert_mlp_torch,
    swiglu_quant_fp8,
)
from expert_worker.kernels.grouped_gemm import (  # noqa: E402
    CONFIGS,
    EPI_SWIGLU_QUANT,
    EPI_WEIGHTED_ADD,
    launch,
    n_tiles_per_cluster,
)
from moe_core.fp8 import (  # noqa: E402
    FP8_DTYPE,
    dequantize_tokens,
    dequantize_weight,
    quantize_tokens,
    quantize_weight,
)

TOL = 1e-2
DEV = torch.device("cuda")
MLPS = {"fused": expert_mlp_fp8, "unfused": expert_mlp_fp8_unfused, "torch": expert_mlp_torch}


def make_experts(counts: list[int], h: int, i: int, num_tokens: int, seed: int):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    m, g = sum(counts), len(counts)
    x = torch.randn(m, h, generator=gen, device=DEV) * torch.exp(
        torch.randn(m, 1, generator=gen, device=DEV)
    )
    x8, xs = quantize_tokens(x)
    w13 = torch.randn(g, 2 * i, h, generator=gen, device=DEV) / h**0.5
    w2 = torch.randn(g, h, i, generator=gen, device=DEV) / i**0.5
    q13 = [quantize_weight(w13[e]) for e in range(g)]
    q2 = [quantize_weight(w2[e]) for e in range(g)]
    return dict(
        x8=x8,
        x_scales=xs,
        group_counts=torch.tensor(counts, dtype=torch.int32, device=DEV),
        w13=torch.stack([q for q, _ in q13]).contiguous(),
        w13_scales=torch.stack([s for _, s in q13]).contiguous(),
        w2=torch.stack([q for q, _ in q2]).contiguous(),
        w2_scales=torch.stack([s for _, s in q2]).contiguous(),
        row_weights=torch.rand(m, generator=gen, device=DEV),
        row_token=torch.randint(0, max(num_tokens, 1), (m,), generator=gen, device=DEV),
        num_tokens=num_tokens,
    )


def reference_h(a: dict, counts: list[int]) -> torch.Tensor:
    """float64 silu(gate) * up, [M, I]."""
    x = dequantize_tokens(a["x8"], a["x_scales"]).double()
    i = a["w13"].shape[1] // 2
    out = torch.empty(x.shape[0], i, dtype=torch.float64, device=DEV)
    start = 0
    for e, c in enumerate(counts):
        gu = x[start : start + c] @ dequantize_weight(a["w13"][e], a["w13_scales"][e]).double().T
        out[start : start + c] = F.silu(gu[:, :i]) * gu[:, i:]
        start += c
    return out


def reference_mlp(a: dict, counts: list[int]) -> torch.Tensor:
    h8, hs = quantize_tokens(reference_h(a, counts).float())
    hq = dequantize_tokens(h8, hs).double()
    out = torch.zeros(a["num_tokens"], a["w2"].shape[1], dtype=torch.float64, device=DEV)
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        y = hq[rows] @ dequantize_weight(a["w2"][e], a["w2_scales"][e]).double().T
        out.index_add_(0, a["row_token"][rows], y * a["row_weights"][rows, None].double())
        start += c
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/Inf"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


RAGGED = [0, 1, 7, 128, 1000]


@pytest.mark.parametrize(
    "counts,h,i",
    [(RAGGED, 256, 256), ([1] * 48, 512, 256), ([16, 0, 16, 3], 384, 384), (RAGGED, 7168, 256)],
)
@pytest.mark.parametrize("config", [c for c in CONFIGS if c.startswith("swiglu")])
def test_swiglu_quant(counts, h, i, config):
    if (i // 128) % n_tiles_per_cluster(CONFIGS[config]):
        pytest.skip("clusters sharing A need an even number of 128-channel tiles")
    a = make_experts(counts, h, i, 8, seed=h + i)
    m = sum(counts)
    h8 = torch.empty(m, i, dtype=FP8_DTYPE, device=DEV)
    h8.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
    hs = torch.full((m, i // 128), float("nan"), device=DEV)
    swiglu_quant_fp8(
        a["x8"],
        a["x_scales"],
        a["group_counts"],
        a["w13"],
        a["w13_scales"],
        out=h8,
        out_scales=hs,
        config=config,
    )
    torch.cuda.synchronize()
    check_swiglu(a, counts, h8, hs)


@pytest.mark.parametrize(
    "config",
    [
        "swiglu_tma128",
        "swiglu_tma128c64",
        "swiglu_tma128ar",
        "swiglu_tma128ss",
        "swiglu_tma128ssc64",
        "swiglu_tma128x2",
        "swiglu_tma128b2",
    ],
)
@pytest.mark.parametrize("max_ctas", [1, 4])
def test_swiglu_persistent_grid(config, max_ctas):
    """v3 SwiGLU epilogue with many tiles per CTA (22 tiles, K = 5 k-blocks)."""
    counts = [300, 0, 517, 1, 129]
    a = make_experts(counts, 640, 256, 8, seed=20 + max_ctas)
    m, i = sum(counts), 256
    h8 = torch.empty(m, i, dtype=FP8_DTYPE, device=DEV)
    h8.view(torch.uint8).fill_(0x7F)
    hs = torch.full((m, i // 128), float("nan"), device=DEV)
    args = (a["x8"], a["x_scales"], a["w13"], a["w13_scales"], a["group_counts"], h8, hs)
    launch(EPI_SWIGLU_QUANT, config, *args, max_ctas=max_ctas)
    torch.cuda.synchronize()
    check_swiglu(a, counts, h8, hs)


def check_swiglu(a: dict, counts: list[int], h8: torch.Tensor, hs: torch.Tensor) -> None:
    ref8, ref_s = quantize_tokens(reference_h(a, counts).float())
    assert torch.isfinite(hs).all() and torch.isfinite(h8.float()).all(), "unwritten h8 or scales"
    # Hopper's FP8 tensor cores accumulate a 128-wide K block with reduced precision (the reason
    # for the per-block promotion), so the scales agree to about 1e-4, not to float32 rounding.
    assert rel_err(hs, ref_s.double()) <= 1e-3
    assert rel_err(dequantize_tokens(h8, hs), dequantize_tokens(ref8, ref_s).double()) <= TOL


@pytest.mark.parametrize("which", list(MLPS))
@pytest.mark.parametrize(
    "counts,h,i,num_tokens",
    [
        (RAGGED, 256, 256, 700),
        ([3, 0, 5, 0], 512, 384, 20),  # most tokens get no rows
        ([1] * 64, 384, 256, 16),
        ([40, 90, 0, 17], 7168, 2048, 64),  # DeepSeek-V3 expert sizes
    ],
)
def test_expert_mlp(which, counts, h, i, num_tokens):
    a = make_experts(counts, h, i, num_tokens, seed=len(counts) + h)
    out = MLPS[which](**a)
    torch.cuda.synchronize()
    assert out.shape == (num_tokens, h) and out.dtype == torch.float32
    ref = reference_mlp(a, counts)
    # The unfused path rounds gate/up to bf16 before re-quantizing, which moves some values
    # across FP8 rounding boundaries: it computes a slightly different function (about 2e-2).
    assert rel_err(out, ref) <= (3e-2 if which == "unfused" else TOL)
    untouched = torch.ones(num_tokens, dtype=torch.bool, device=DEV)
    untouched[a["row_token"]] = False
    assert (out[untouched] == 0).all(), "tokens with no rows must be zero"


@pytest.mark.parametrize(
    "config,max_ctas",
    [
        ("wg128n256", None),
        ("tma128n256b2", None),
        ("tma128n256b2", 3),
        ("tma128n256x2", None),
        ("tma128n256x2", 3),
        ("tma128n256", None),
        ("tma128n256", 3),
        ("tma128n256c64", None),
        ("tma128n256c64", 3),
        ("tma128n256ar", None),
        ("tma128n256ar", 3),
        ("tma128n256ss", None),
        ("tma128n256ss", 3),
        ("tma128n256ssc64", None),
        ("tma128n256ssc64", 3),
        ("tma128", 5),
    ],
)
def test_weighted_add(config, max_ctas):
    """Down-GEMM epilogue alone: out[row_token[r]] += row_weights[r] * (h_r @ W2[g]^T)."""
    counts = [300, 0, 517, 1, 129]
    h, i, num_tokens = 512, 640, 900
    a = make_experts(counts, h, i, num_tokens, seed=30)
    gen = torch.Generator(device=DEV).manual_seed(31)
    h8, hs = quantize_tokens(torch.randn(sum(counts), i, generator=gen, device=DEV))
    out = torch.zeros(num_tokens, h, device=DEV)
    launch(
        EPI_WEIGHTED_ADD, config, h8, hs, a["w2"], a["w2_scales"], a["group_counts"], out,
        row_weights=a["row_weights"], row_token=a["row_token"], max_ctas=max_ctas,
    )  # fmt: skip
    torch.cuda.synchronize()
    hq = dequantize_tokens(h8, hs).double()
    ref = torch.zeros(num_tokens, h, dtype=torch.float64, device=DEV)
    start = 0
    for e, c in enumerate(counts):
        rows = slice(start, start + c)
        y = hq[rows] @ dequantize_weight(a["w2"][e], a["w2_scales"][e]).double().T
        ref.index_add_(0, a["row_token"][rows], y * a["row_weights"][rows, None].double())
        start += c
    assert rel_err(out, ref) <= TOL


def test_no_rows():
    a = make_experts([0, 0], 256, 256, 5, seed=0)
    out = expert_mlp_fp8(**a)
    assert out.shape == (5, 256) and (out == 0).all()


def test_readable_asserts():
    a = make_experts([2, 3], 256, 256, 4, seed=0)
    with pytest.raises(AssertionError, match="row_token must be int64"):
        expert_mlp_fp8(**dict(a, row_token=a["row_token"].int()))
    with pytest.raises(AssertionError, match="w2 must be"):
        expert_mlp_fp8(**dict(a, w2=a["w2"][:, :128].contiguous()))
