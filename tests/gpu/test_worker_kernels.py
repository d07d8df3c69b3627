"""The expert worker's fp8 shard on a GPU: the CUDA kernels against their torch twin.

Both run inside `ExpertShard.forward` on the same FP8 weights and tokens; the kernels must agree
with the twin within ||out - ref|| / ||ref|| <= 1e-2, including a model whose expert
intermediate size is not a multiple of 128 (the shard pads it with zeros).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from expert_worker.experts import ExpertShard
from moe_cluster.demo_model import demo_config, demo_tensors
from moe_core.fp8 import quantize_tokens
from moe_core.precision import Precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = 1e-2


def write_model(path, moe_intermediate: int):
    """The demo architecture (hidden 256) with a chosen expert width, random weights."""
    config = demo_config() | {"moe_intermediate_size": moe_intermediate}
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in demo_tensors(config, seed=3).items()},
        path / "model.safetensors",
    )
    return path


@pytest.mark.parametrize("moe_intermediate", [128, 96, 320])
def test_cuda_kernels_match_the_torch_twin_inside_the_shard(tmp_path, moe_intermediate):
    model = write_model(tmp_path / "model", moe_intermediate)
    held = [1, 2, 5, 9]
    kwargs = dict(precision=Precision.FP8, device="cuda", progress=False)
    cuda = ExpertShard.load(model, held, kernels="cuda", **kwargs)
    twin = ExpertShard.load(model, held, kernels="torch", **kwargs)
    assert (cuda.kernels, twin.kernels) == ("cuda", "torch")
    gen = torch.Generator().manual_seed(0)
    for num_tokens in (1, 7, 300):
        x = torch.randn(num_tokens, cuda.spec.hidden_size, generator=gen)
        x8, scales = (t.cuda() for t in quantize_tokens(x))
        ids = torch.tensor(held)[torch.randint(0, len(held), (num_tokens, 3), generator=gen)]
        ids[0, 2] = -1  # an empty slot
        weights = torch.rand(num_tokens, 3, generator=gen)
        ids, weights = ids.cuda(), weights.cuda()
        layer = cuda.spec.moe_layers[0]
        out = cuda.forward(layer, x8, scales, ids, weights)
        ref = twin.forward(layer, x8, scales, ids, weights)
        assert out.shape == (num_tokens, cuda.spec.hidden_size) and out.dtype == torch.float32
        error = ((out - ref).norm() / ref.norm()).item()
        assert error <= TOLERANCE, f"I={moe_intermediate}, T={num_tokens}: relative error {error}"
