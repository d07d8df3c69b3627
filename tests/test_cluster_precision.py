"""The wire formats end to end: a DeepSeek FP8 checkpoint (hidden 160, expert width 96, so edge
blocks are partial) served by a real cluster at each precision, against HF transformers float32
eager on the dequantized checkpoint.

fp32 must equal the reference (1e-3 max abs). bf16 and fp8 send BF16 / FP8 tokens (one scale per
token per 128 channels) to the workers and get BF16 rows back: they must give what the same model
gives in-process at the same precision (so the wire adds no error of its own), and stay close to
the reference. The printed top-1 agreement and relative logit error are the README's numbers.
"""

from __future__ import annotations

import hf_models
import numpy as np
import pytest
import torch

from moe_client import Client
from moe_cluster import LocalCluster

PROMPTS = [hf_models.random_prompt(24, seed=s) for s in (30, 31, 32, 33)]  # 96 positions
ROUTER_ARGS = ("--max-batch-size", "4", "--max-seq-len", "128")
# (min top-1 agreement, max relative logit error) against HF over the 96 positions; the measured
# values are printed. A routing decision that flips on one position moves these visibly.
BOUNDS = {"bf16": (0.95, 0.03), "fp8": (0.95, 0.06)}
WIRE_TOLERANCE = 1e-3  # relative logit difference, cluster vs in-process (measured: 0; one bf16
# ulp of error on every combined row would show as 4.5e-3)


@pytest.fixture(scope="module")
def reference(checkpoints) -> torch.Tensor:
    """HF float32 eager logits on the dequantized FP8 checkpoint: [positions, vocab]."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        hf = checkpoints.hf(checkpoints.fp8_dequantized())
        return torch.cat([hf_models.hf_logits(hf, p) for p in PROMPTS])
    finally:
        torch.set_num_threads(threads)


def cluster_logits(model_dir, precision: str) -> torch.Tensor:
    with (
        LocalCluster(model_dir, workers=2, precision=precision, router_args=ROUTER_ARGS) as c,
        Client(c.address, timeout=120) as client,
    ):
        assert client.info()["precision"] == precision
        return torch.cat([torch.from_numpy(client.logits(p)) for p in PROMPTS])


def test_fp32_serves_the_fp8_checkpoint_exactly(checkpoints, reference):
    got = cluster_logits(checkpoints.fp8(), "fp32")
    diff = np.abs(got.numpy() - reference.numpy()).max()
    assert diff < 1e-3, f"fp32 cluster differs from HF on the dequantized checkpoint by {diff}"


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_bf16_and_fp8_wire_formats_stay_close(checkpoints, reference, precision):
    got = cluster_logits(checkpoints.fp8(), precision)
    in_process = hf_models.our_model(checkpoints.fp8(), precision=precision, dtype=torch.bfloat16)
    local = torch.cat(hf_models.prefill_logits(in_process, PROMPTS)).float()
    wire = ((got - local).norm() / local.norm()).item()
    assert wire <= WIRE_TOLERANCE, f"the {precision} cluster differs from in-process by {wire}"
    top1, rel, median = hf_models.agreement(got, reference)
    print(
        f"\ncluster {precision} (2 workers) vs HF fp32 on the dequantized FP8 checkpoint, "
        f"{got.shape[0]} positions: top-1 agreement {top1:.3f}, relative logit error {rel:.4f} "
        f"(median per position {median:.4f}); cluster vs in-process {wire:.1e}"
    )
    min_top1, max_rel = BOUNDS[precision]
    assert top1 >= min_top1 and rel <= max_rel, (top1, rel)
