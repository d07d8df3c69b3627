"""FP8 block-scaled grouped GEMM kernel vs a float64 torch reference (needs a CUDA GPU).

Tolerance: ||out - ref|| / ||ref|| <= 1e-2 (bf16 output rounding is about 2e-3). Outputs are
poisoned with NaN before each run so an element the kernel never writes fails the check.
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("cuda.bindings")

from expert_worker.kernels import grouped_gemm_fp8, nvrtc  # noqa: E402
from expert_worker.kernels.grouped_gemm import (  # noqa: E402
    CONFIGS,
    EPI_BF16,
    launch,
    n_tiles_per_cluster,
)
from moe_core.fp8 import (  # noqa: E402
    BLOCK,
    dequantize_tokens,
    dequantize_weight,
    quantize_tokens,
    quantize_weight,
)

TOL = 1e-2
DEV = torch.device("cuda")


def blocky(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random data whose magnitude varies per 128x128 block (and per row), so scales matter."""
    x = torch.randn(shape, generator=gen, device=DEV)
    rows, cols = shape[-2], shape[-1]
    nb, kb = -(-rows // BLOCK), -(-cols // BLOCK)
    f = torch.exp(torch.randn(*shape[:-2], nb, kb, generator=gen, device=DEV))
    f = f.repeat_interleave(BLOCK, -2)[..., :rows, :].repeat_interleave(BLOCK, -1)[..., :cols]
    return x * f


def make_case(counts: list[int], n: int, k: int, seed: int):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    m = sum(counts)
    x = blocky((m, k), gen) * torch.exp(torch.randn(m, 1, generator=gen, device=DEV))
    a8, a_s = quantize_tokens(x)
    w = blocky((len(counts), n, k), gen)
    qs = [quantize_weight(w[g]) for g in range(len(counts))]
    b8 = torch.stack([q for q, _ in qs]).contiguous()
    b_s = torch.stack([s for _, s in qs]).contiguous()
    c = torch.tensor(counts, dtype=torch.int32, device=DEV)
    return a8, a_s, b8, b_s, c


def reference(a8, a_s, b8, b_s, counts: list[int]) -> torch.Tensor:
    a = dequantize_tokens(a8, a_s).double()
    out = torch.empty(a.shape[0], b8.shape[1], dtype=torch.float64, device=DEV)
    start = 0
    for g, c in enumerate(counts):
        b = dequantize_weight(b8[g], b_s[g]).double()
        out[start : start + c] = a[start : start + c] @ b.T
        start += c
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/Inf: some element was not written"
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(counts: list[int], n: int, k: int, seed: int, config: str | None = None) -> float:
    a8, a_s, b8, b_s, c = make_case(counts, n, k, seed)
    out = torch.full((sum(counts), n), float("nan"), dtype=torch.bfloat16, device=DEV)
    grouped_gemm_fp8(a8, a_s, b8, b_s, c, out=out, config=config)
    torch.cuda.synchronize()
    return rel_err(out, reference(a8, a_s, b8, b_s, counts))


RAGGED = [0, 1, 7, 128, 1000]


@pytest.mark.parametrize("config", [c for c in CONFIGS if not c.startswith("swiglu")])
def test_every_config_ragged(config):
    n = 256 * n_tiles_per_cluster(CONFIGS[config])
    assert run_case(RAGGED, n, 512, seed=1, config=config) <= TOL


@pytest.mark.parametrize(
    "counts,n,k",
    [
        (RAGGED, 384, 1024),
        ([1000], 128, 128),
        ([7, 0, 0, 1, 128, 0], 512, 384),
        ([0, 0, 0, 5], 256, 256),
        ([1] * 64, 256, 512),
        ([4] * 32, 256, 512),
        ([16] * 40, 384, 256),
        ([(37 * i) % 301 for i in range(33)], 256, 640),
    ],
)
def test_ragged_shapes(counts, n, k):
    assert run_case(counts, n, k, seed=len(counts) + n) <= TOL


PREFILL_CONFIGS = [
    "wg128n256",
    "tma128n256b2",
    "tma128n256x2",
    "tma128n256",
    "tma128n256c64",
    "tma128n256ar",
    "tma128n256ss",
    "tma128n256ssc64",
    "tma128",
]
TMA_CONFIGS = [c for c, v in CONFIGS.items() if v.get("TMA") and not c.startswith("swiglu")]


@pytest.mark.parametrize("config", PREFILL_CONFIGS)
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)])
def test_deepseek_v3_shapes(n, k, config):
    assert run_case([0, 1, 7, 128, 300], n, k, seed=3, config=config) <= TOL


@pytest.mark.parametrize("config", TMA_CONFIGS)
@pytest.mark.parametrize("max_ctas", [1, 3, 7])
def test_persistent_grid(config, max_ctas):
    """Many tiles per CTA: the TMA ring's stages and barrier phases carry over between tiles.

    K = 640 is 5 k-blocks, so a tile ends mid-ring; 44 or 88 tiles over 1, 3 or 7 CTAs (clusters
    of two: 1, 1 or 3 clusters).
    """
    counts = [300, 0, 517, 1, 129]
    a8, a_s, b8, b_s, c = make_case(counts, 1024, 640, seed=10 + max_ctas)
    out = torch.full((sum(counts), 1024), float("nan"), dtype=torch.bfloat16, device=DEV)
    launch(EPI_BF16, config, a8, a_s, b8, b_s, c, out, max_ctas=max_ctas)
    torch.cuda.synchronize()
    assert rel_err(out, reference(a8, a_s, b8, b_s, counts)) <= TOL


def test_fresh_inputs_each_run():
    for seed in range(3):
        assert run_case([3, 130, 0, 64], 256, 256, seed=100 + seed) <= TOL


def test_empty():
    a8, a_s, b8, b_s, c = make_case([0, 0], 128, 128, seed=0)
    assert grouped_gemm_fp8(a8, a_s, b8, b_s, c).shape == (0, 128)


def test_readable_asserts():
    a8, a_s, b8, b_s, c = make_case([2, 3], 128, 256, seed=0)
    with pytest.raises(AssertionError, match="a_scales must be"):
        grouped_gemm_fp8(a8, a_s[:, :1].contiguous(), b8, b_s, c)
    with pytest.raises(AssertionError, match="group_counts must be int32"):
        grouped_gemm_fp8(a8, a_s, b8, b_s, c.long())
    with pytest.raises(AssertionError, match="a8 must be float8_e4m3fn"):
        grouped_gemm_fp8(a8.float(), a_s, b8, b_s, c)


def test_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(nvrtc.CACHE_ENV, str(tmp_path))
    defines = dict(CONFIGS["m64"], STAGES=3, EPI=0)
    monkeypatch.setattr(nvrtc, "_loaded", {})
    monkeypatch.setattr(nvrtc, "_by_request", {})
    k1 = nvrtc.load_kernel("grouped_gemm.cu", "grouped_gemm_fp8", defines, DEV)
    assert "registers" in k1.log  # compiled now (ptxas report in the log)
    files = list(tmp_path.glob("*.cubin"))
    assert len(files) == 1, files
    assert nvrtc.load_kernel("grouped_gemm.cu", "grouped_gemm_fp8", defines, DEV) is k1
    monkeypatch.setattr(nvrtc, "_loaded", {})
    monkeypatch.setattr(nvrtc, "_by_request", {})
    k2 = nvrtc.load_kernel("grouped_gemm.cu", "grouped_gemm_fp8", defines, DEV)
    assert k2 is not k1 and k2.log == ""  # loaded from disk, not compiled
