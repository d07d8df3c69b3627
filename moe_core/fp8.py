"""Block-wise FP8 (float8_e4m3fn) quantization in the DeepSeek-V3 format.

Weights: one float32 scale per 128x128 block, W[i, j] = W8[i, j] * s[i // 128, j // 128].
Activations: one float32 scale per token per 128 channels, x[t, j] = x8[t, j] * s[t, j // 128].
Edge blocks may be partial (a dimension that is not a multiple of 128); their scale covers only
the elements that exist.
"""

import torch

BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP8_DTYPE = torch.float8_e4m3fn
_MIN_AMAX = 1e-12  # an all-zero block gets a tiny scale instead of a division by zero


def num_blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def _pad_to_blocks(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad the given dims of x up to multiples of BLOCK."""
    pad: list[int] = []
    for d in reversed(range(x.dim())):
        extra = (-x.shape[d]) % BLOCK if d in dims else 0
        pad += [0, extra]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> ([N, K] float8_e4m3fn, [ceil(N/128), ceil(K/128)] float32 scales)."""
    assert w.dim() == 2, f"expected [N, K], got {tuple(w.shape)}"
    n, k = w.shape
    nb, kb = num_blocks(n), num_blocks(k)
    padded = _pad_to_blocks(w.float(), (0, 1))  # [nb*128, kb*128]
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(_MIN_AMAX)  # [nb, kb]
    scales = amax / FP8_MAX
    q = (blocks / scales[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w8 = q.view(nb * BLOCK, kb * BLOCK)[:n, :k].to(FP8_DTYPE).contiguous()
    return w8, scales.contiguous()


def dequantize_weight(w8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """([N, K] float8_e4m3fn, [ceil(N/128), ceil(K/128)] float32) -> [N, K] float32."""
    assert w8.dim() == 2 and scales.dim() == 2, (tuple(w8.shape), tuple(scales.shape))
    n, k = w8.shape
    if tuple(scales.shape) != (num_blocks(n), num_blocks(k)):
        raise ValueError(
            f"weight of shape {tuple(w8.shape)} needs scales of shape "
            f"{(num_blocks(n), num_blocks(k))}, got {tuple(scales.shape)}"
        )
    expanded = scales.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return w8.float() * expanded


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, K] float -> ([T, K] float8_e4m3fn, [T, ceil(K/128)] float32 scales), per token."""
    assert x.dim() == 2, f"expected [T, K], got {tuple(x.shape)}"
    t, k = x.shape
    kb = num_blocks(k)
    groups = _pad_to_blocks(x.float(), (1,)).view(t, kb, BLOCK)
    scales = groups.abs().amax(dim=2).clamp_min(_MIN_AMAX) / FP8_MAX  # [T, kb]
    q = (groups / scales[:, :, None]).clamp(-FP8_MAX, FP8_MAX)
    x8 = q.view(t, kb * BLOCK)[:, :k].to(FP8_DTYPE).contiguous()
    return x8, scales.contiguous()


def dequantize_tokens(x8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """([T, K] float8_e4m3fn, [T, ceil(K/128)] float32) -> [T, K] float32."""
    assert x8.dim() == 2 and scales.dim() == 2, (tuple(x8.shape), tuple(scales.shape))
    t, k = x8.shape
    if tuple(scales.shape) != (t, num_blocks(k)):
        raise ValueError(
            f"tokens of shape {tuple(x8.shape)} need scales of shape {(t, num_blocks(k))}, "
            f"got {tuple(scales.shape)}"
        )
    return x8.float() * scales.float().repeat_interleave(BLOCK, 1)[:, :k]
