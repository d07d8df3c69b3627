"""The expert worker's fp8 shard on a GPU: the CUDA kernels against their torch twin.

Both run inside `ExpertShard.forward` on the same FP8 weights and tokens; the kernels must agree
with the twin within ||out - ref|| / ||ref|| <= 1e-2, including a model whose expert
intermediate size is not a multiple of 128 (the shard pads it with zeros). And the worker's wire
path on the GPU: one synchronization per call, non-finite tokens still refused.
"""

from __future__ import annotations

import json
import struct
import warnings

import grpc
import pytest
import torch
from safetensors.torch import save_file

from expert_worker import service, wire_forward
from expert_worker.experts import ExpertShard
from moe_cluster.demo_model import demo_config, demo_tensors
from moe_core import token_format as tf
from moe_core.fp8 import quantize_tokens
from moe_core.precision import Precision
from protos import expert_pb2

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


def _request(x, ids, weights, layer, result=tf.BF16) -> expert_pb2.ExpertForwardRequest:
    return expert_pb2.ExpertForwardRequest(
        layer=layer,
        tokens=tf.encode_tokens(x, Precision.FP8),
        slots=ids.shape[1],
        expert_ids=tf.pack_expert_ids(ids),
        expert_weights=tf.pack_expert_weights(weights),
        result_format=result,
    )


def test_a_worker_call_synchronizes_once_and_still_refuses_non_finite_tokens(tmp_path):
    """The wire path leaves the tokens' finite check on the device and reads its verdict with
    the result rows: one synchronization per call. A refused call names the first bad value and
    is not counted in the shard's expert load."""
    model = write_model(tmp_path / "model", 128)
    held = [1, 2, 5, 9]
    shard = ExpertShard.load(model, held, Precision.FP8, "cuda", progress=False, kernels="cuda")
    layer = shard.spec.moe_layers[0]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, shard.spec.hidden_size, generator=gen)
    ids = torch.tensor(held)[torch.randint(0, len(held), (40, 2), generator=gen)]
    weights = torch.rand(40, 2, generator=gen)
    raw = _request(x, ids, weights, layer).SerializeToString()
    wire_forward.forward_bytes(shard, raw)  # compiles the kernels
    before = shard.expert_load()

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = wire_forward.forward_bytes(shard, raw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
    got = tf.decode_result(expert_pb2.ExpertForwardResponse.FromString(reply).result)
    x8, scales = quantize_tokens(x)
    want = shard.forward(layer, x8.cuda(), scales.cuda(), ids, weights).to(torch.bfloat16)
    assert torch.equal(got.to(torch.bfloat16), want.cpu())
    load = shard.expert_load()
    assert sum(load.values()) - sum(before.values()) == 2 * 2 * 40  # both calls counted

    for field, offset, value, message in [
        ("scales", 4 * 5, struct.pack("<f", float("nan")), "tokens (FP8 scales): non-finite"),
        ("scales", 0, struct.pack("<f", float("inf")), "tokens (FP8 scales): non-finite"),
        ("data", 3 * shard.spec.hidden_size + 7, b"\x7f", "non-finite value at row 3, column 7"),
    ]:
        bad = _request(x, ids, weights, layer)
        data = bytearray(getattr(bad.tokens, field))
        data[offset : offset + len(value)] = value
        setattr(bad.tokens, field, bytes(data))
        with pytest.raises(service.RequestError) as info:
            wire_forward.forward_bytes(shard, bad.SerializeToString())
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.message
    assert shard.expert_load() == load  # the refused calls were not counted
