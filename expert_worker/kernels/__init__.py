"""CUDA kernels of the expert worker: FP8 block-scaled grouped GEMM and the expert MLP.

Sources (`*.cu`) are compiled at first use with NVRTC through cuda-python and cached on disk
(`MOE_KERNEL_CACHE_DIR`). Importing this package needs neither cuda-python nor a GPU.
"""

from .expert_mlp import expert_mlp_fp8, expert_mlp_fp8_unfused, expert_mlp_torch, swiglu_quant_fp8
from .grouped_gemm import grouped_gemm_fp8

__all__ = [
    "expert_mlp_fp8",
    "expert_mlp_fp8_unfused",
    "expert_mlp_torch",
    "grouped_gemm_fp8",
    "swiglu_quant_fp8",
]
