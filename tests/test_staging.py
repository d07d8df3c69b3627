"""One transfer per Forward call: `expert_worker.staging` and the host routing plan it carries."""

import numpy as np
import pytest
import torch

from expert_worker import staging
from expert_worker.experts import ExpertShard
from moe_core import token_format as tf
from moe_core.precision import Precision
from moe_core.spec import ModelSpec


def test_arrays_keep_their_values_dtypes_and_shapes():
    gen = np.random.default_rng(0)
    arrays = [
        np.frombuffer(gen.integers(0, 256, 15, dtype=np.uint8).tobytes(), dtype=np.uint8),  # odd
        gen.standard_normal((3, 5)).astype(np.float32),
        gen.integers(-5, 5, 7).astype(np.int64),
        gen.integers(0, 9, (2, 2)).astype(np.int32)[:, ::-1],  # not contiguous
    ]
    out = staging.to_device(arrays, torch.device("cpu"))
    assert [t.dtype for t in out] == [torch.uint8, torch.float32, torch.int64, torch.int32]
    for a, t in zip(arrays, out, strict=True):
        assert t.shape == a.shape
        assert np.array_equal(t.numpy(), a)
    out[0][0] = 1  # writable copies, even of read-only views


def _shard(held: list[int], experts: int = 8) -> ExpertShard:
    spec = ModelSpec.__new__(ModelSpec)
    object.__setattr__(spec, "num_experts", experts)
    object.__setattr__(spec, "hidden_size", 128)
    return ExpertShard(spec, held, Precision.FP32, torch.device("cpu"), {}, kernels="torch")


def test_host_plan_groups_each_used_slot_by_held_expert_in_token_order():
    shard = _shard([1, 5, 6])  # local ids: 1 -> 0, 5 -> 1, 6 -> 2
    ids = np.array([[5, 1, -1], [6, 5, 1], [-1, -1, 6], [1, 6, -1]], dtype=np.int32)
    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    plan = shard.plan_host(ids, weights)
    want = []  # (local expert, token, weight) in the order the kernels take the rows
    for expert in (1, 5, 6):
        for t in range(4):
            for s in range(3):
                if ids[t, s] == expert:
                    want.append((t, weights[t, s]))
    assert plan.tokens.tolist() == [t for t, _ in want]
    assert plan.row_weights.tolist() == pytest.approx([w for _, w in want])
    assert plan.rows_per_expert.tolist() == [3, 2, 3]
    assert plan.tokens.dtype == np.int64 and plan.rows_per_expert.dtype == np.int32
    with pytest.raises(ValueError, match=r"expert_ids\[1, 2\] = 3 is not held by this shard"):
        shard.plan_host(np.array([[1, -1, -1], [5, 6, 3]]), np.zeros((2, 3), np.float32))


def test_host_views_read_the_wire_bytes_in_place_and_check_their_lengths():
    x = torch.randn(3, 256)
    batch = tf.encode_tokens(x, "fp8")
    data, scales = tf.host_tokens(batch)
    assert data.shape == (3, 256) and scales.shape == (3, 2) and scales.dtype == np.float32
    got, got_scales = tf.decode_tokens(batch)
    assert np.array_equal(data, got.view(torch.uint8).numpy())
    assert np.array_equal(scales, got_scales.numpy())
    batch.scales = batch.scales[:-4]
    with pytest.raises(tf.WireFormatError, match="tokens .FP8 scales.: expected 24 bytes"):
        tf.host_tokens(batch)
    ids, weights = tf.host_routing(bytes(24), bytes(24), 3, 2)
    assert ids.dtype == np.int32 and weights.shape == (3, 2)
    with pytest.raises(tf.WireFormatError, match=r"expert_weights \(float32\): expected 24"):
        tf.host_routing(bytes(24), bytes(20), 3, 2)
