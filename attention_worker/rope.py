"""Rotary position embeddings: default, linear and YaRN frequencies; half-split or interleaved.

The frequencies are computed with the same float32 operations as transformers, so cos/sin are
bitwise equal to the reference. Shapes: T = tokens, h = heads, d = rotated channels.
"""

from __future__ import annotations

import math

import torch

from moe_core.spec import RopeSpec


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, blend linearly in between."""
    dim, base, factor = rope.dim, rope.theta, rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = _yarn_mscale(factor, rope.mscale) / _yarn_mscale(
            factor, rope.mscale_all_dim
        )
    else:
        attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        max_pos = rope.original_max_position_embeddings
        return (dim * math.log(max_pos / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 = keep the original (extrapolated) frequency
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def inverse_frequencies(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """([d/2] float32 inverse frequencies, factor multiplying cos and sin)."""
    if rope.kind == "yarn":
        return _yarn_inv_freq(rope)
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.int64).to(dtype=torch.float) / rope.dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        inv_freq /= rope.factor
    return inv_freq, 1.0


def mla_softmax_scale(rope: RopeSpec, qk_head_dim: int) -> float:
    """DeepSeek's softmax scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 when
    the rope is scaled."""
    scale = qk_head_dim**-0.5
    if rope.kind != "default" and rope.mscale_all_dim:
        mscale = _yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


class RotaryEmbedding(torch.nn.Module):
    """positions [T] -> (cos, sin) [T, d/2] in the model dtype; `rotate` applies them."""

    def __init__(self, rope: RopeSpec) -> None:
        super().__init__()
        self.interleaved = rope.interleaved
        # a plain CPU attribute, not a buffer: it stays float32 whatever dtype the model takes,
        # and is real even when the model is built on the meta device
        with torch.device("cpu"):
            self.inv_freq, self.attention_factor = inverse_frequencies(rope)
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}  # copies on other devices

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        inv_freq = self._inv_freq(positions.device)
        freqs = positions[:, None].float() * inv_freq  # [T, d/2]
        cos = freqs.cos() * self.attention_factor
        sin = freqs.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        """inv_freq on `device`, copied there once (a copy per call cannot be in a CUDA graph)."""
        if device.type == "cpu":
            return self.inv_freq
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self.inv_freq.to(device)
        return self._inv_freq_on[device]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, h, d] -> [T, h, d]. Interleaved input pairs (x0, x1), (x2, x3)... come out
        de-interleaved (rotated evens, then rotated odds), as transformers' DeepSeek does; q and k
        get the same layout, so their dot products are unchanged."""
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, d/2]
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
