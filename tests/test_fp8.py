"""FP8: the block format against its formula, FP8 checkpoints, and the fp8 expert precision.

The FP8 checkpoint is a DeepSeek-V3 model with hidden 160, expert intermediate 96 and other sizes
that are not multiples of 128, so most weights have partial edge blocks. HF cannot quantize on
CPU; it runs the float32 model the FP8 checkpoint stands for (dequantized by formula).
"""

import pytest
import torch
from hf_models import (
    BLOCK,
    agreement,
    dequantize_reference,
    hf_logits,
    our_model,
    prefill_logits,
    quantize_reference,
    random_prompt,
    read_tensors,
)

from expert_worker.experts import ExpertShard
from moe_core import fp8
from moe_core.checkpoint import Checkpoint
from moe_core.naming import load_expert_fp8
from moe_core.precision import Precision
from moe_core.spec import ModelSpec

pytestmark = pytest.mark.usefixtures("single_thread")


def _weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Blocks of very different magnitudes, so each block's scale matters."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.randint(-3, 3, (rows // BLOCK + 1, cols // BLOCK + 1), generator=gen)
    scale = magnitude.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return torch.randn(rows, cols, generator=gen) * scale


@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (5, 130), (96, 160)])
def test_weight_quantization_matches_formula_everywhere(shape):
    w = _weight(*shape, seed=shape[0])
    w8, scales = fp8.quantize_weight(w)
    ref_w8, ref_scales = quantize_reference(w)
    assert scales.shape == (-(-shape[0] // BLOCK), -(-shape[1] // BLOCK))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(w8.view(torch.uint8), ref_w8.view(torch.uint8))
    assert torch.equal(fp8.dequantize_weight(w8, scales), dequantize_reference(w8, scales))


@pytest.mark.parametrize("shape", [(7, 300), (1, 128), (3, 96)])
def test_token_quantization_matches_formula_everywhere(shape):
    x = _weight(*shape, seed=shape[1])
    x8, scales = fp8.quantize_tokens(x)
    cols = torch.arange(shape[1]) // BLOCK  # block of each channel
    amax = torch.stack([x[:, cols == b].abs().amax(dim=1) for b in range(int(cols.max()) + 1)], 1)
    assert torch.equal(scales, amax.clamp_min(1e-12) / fp8.FP8_MAX)
    expected = (x / scales[:, cols]).clamp(-fp8.FP8_MAX, fp8.FP8_MAX).to(fp8.FP8_DTYPE)
    assert torch.equal(x8.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(fp8.dequantize_tokens(x8, scales), x8.float() * scales[:, cols])


def test_fp8_checkpoint_dequantizes_by_formula_at_every_element(checkpoints):
    path = checkpoints.fp8()
    stored = read_tensors(path)
    ckpt = Checkpoint(path)
    quantized = [n for n in ckpt.names() if ckpt.is_fp8(n)]
    assert len(quantized) == sum(n.endswith("_scale_inv") for n in stored)
    assert any(stored[n].shape[0] % BLOCK and stored[n].shape[1] % BLOCK for n in quantized)
    for name in quantized:
        w8, scales = stored[name], stored[name + "_scale_inv"]
        assert torch.equal(ckpt.load(name), dequantize_reference(w8, scales)), name
        raw8, raw_scales = ckpt.load_fp8(name)
        assert torch.equal(raw8.view(torch.uint8), w8.view(torch.uint8))
        assert torch.equal(raw_scales, scales)
    assert ckpt.load_fp8("model.embed_tokens.weight") is None


def test_fp32_on_fp8_checkpoint_equals_hf_on_dequantized(checkpoints):
    hf = checkpoints.hf(checkpoints.fp8_dequantized())
    model = our_model(checkpoints.fp8(), "fp32")
    prompts = [random_prompt(12, seed=20), random_prompt(5, seed=21)]
    for prompt, ours in zip(prompts, prefill_logits(model, prompts), strict=True):
        assert (ours - hf_logits(hf, prompt)).abs().max().item() < 1e-3


def test_fp8_shard_uses_checkpoint_fp8_weights_and_requantizes_the_intermediate(checkpoints):
    """One expert's output equals the formula computed from the checkpoint's own FP8 bytes."""
    path = checkpoints.fp8()
    spec = ModelSpec.from_dir(path)
    layer, expert = spec.moe_layers[0], 5
    shard = ExpertShard.load(path, [expert, 6], Precision.FP8, progress=False)
    x = torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(22))
    x8, x_scales = fp8.quantize_tokens(x)
    ids = torch.tensor([[expert, -1]] * 9)
    weights = torch.full((9, 2), 0.5)
    out = shard.forward(layer, x8, x_scales, ids, weights)

    raw = load_expert_fp8(Checkpoint(path), spec, layer, expert)
    xd = fp8.dequantize_tokens(x8, x_scales)
    gate = xd @ dequantize_reference(raw.gate, raw.gate_scales).T
    up = xd @ dequantize_reference(raw.up, raw.up_scales).T
    h = fp8.dequantize_tokens(*fp8.quantize_tokens(torch.nn.functional.silu(gate) * up))
    expected = 0.5 * (h @ dequantize_reference(raw.down, raw.down_scales).T)
    assert (out - expected).abs().max().item() < 1e-6
    assert shard.expert_load() == {expert: 9, 6: 0}


@pytest.mark.parametrize(
    "source, dense_dtype",
    [
        ("fp8 checkpoint", torch.float32),
        ("fp8 checkpoint", torch.bfloat16),
        ("fp32", torch.float32),
    ],
)
def test_fp8_precision_stays_close_to_hf(checkpoints, source, dense_dtype):
    """fp8 experts, on the FP8 checkpoint (its own weights) or on the float32 source (quantized
    at load), against HF float32 on the model each stands for."""
    if source == "fp32":
        path = ref_path = checkpoints.get("deepseek_v3_fp8src")
    else:
        path, ref_path = checkpoints.fp8(), checkpoints.fp8_dequantized()
    prompts = [random_prompt(24, seed=s) for s in (30, 31, 32, 33)]
    ref = torch.cat([hf_logits(checkpoints.hf(ref_path), p) for p in prompts])
    ours = torch.cat(prefill_logits(our_model(path, "fp8", dense_dtype), prompts))
    top1, rel, median = agreement(ours, ref)
    dtype = str(dense_dtype).removeprefix("torch.")
    print(
        f"\nfp8 experts on {source}, dense {dtype}, vs HF fp32 over {len(ref)} positions: "
        f"top-1 agreement {top1:.3f}, relative logit error {rel:.4f} (median {median:.4f})"
    )
    assert top1 > 0.85
    assert rel < 0.15
    assert median < 0.08  # e4m3 keeps 3 mantissa bits: ~4 % per quantized activation
