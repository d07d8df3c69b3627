"""Forward messages built and read without protobuf (moe_core.wire), and the router's dispatch
planning: the bytes are exactly protobuf's, both ways; the plan sends each token once per worker
with its slots in top-k order; the tokens staged for the wire are `encode_tokens`' bytes."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core import token_format as tf
from moe_core import wire
from moe_core.precision import Precision
from protos import expert_pb2
from router.dispatch import WireTokens, WorkerPlan, plan_dispatch, split_plan

seeds = st.integers(0, 2**31 - 1)


def _request(seed: int, precision: Precision, layer: int) -> expert_pb2.ExpertForwardRequest:
    gen = torch.Generator().manual_seed(seed)
    t, h, s = int(torch.randint(1, 9, (1,), generator=gen)), 256, 3
    x = torch.randn(t, h, generator=gen)
    ids = torch.randint(-1, 16, (t, s), generator=gen)
    return expert_pb2.ExpertForwardRequest(
        layer=layer,
        tokens=tf.encode_tokens(x, precision),
        slots=s,
        expert_ids=tf.pack_expert_ids(ids),
        expert_weights=tf.pack_expert_weights(torch.rand(t, s, generator=gen)),
        result_format=tf.result_format(precision),
    )


@settings(max_examples=30, deadline=None)
@given(seed=seeds, precision=st.sampled_from(list(Precision)), layer=st.integers(0, 300))
def test_request_bytes_are_protobufs_both_ways(seed, precision, layer):
    message = _request(seed, precision, layer)
    tokens = message.tokens
    ours = wire.encode_forward_request(
        layer=message.layer,
        token_format=tokens.format,
        num_tokens=tokens.num_tokens,
        hidden=tokens.hidden,
        data=memoryview(tokens.data),
        scales=tokens.scales or None,
        slots=message.slots,
        expert_ids=message.expert_ids,
        expert_weights=message.expert_weights,
        result_format=message.result_format,
    )
    assert ours == message.SerializeToString()
    view = wire.decode_forward_request(ours)
    assert (view.layer, view.slots, view.result_format) == (layer, 3, message.result_format)
    assert view.HasField("tokens")
    assert (view.tokens.format, view.tokens.num_tokens, view.tokens.hidden) == (
        tokens.format,
        tokens.num_tokens,
        tokens.hidden,
    )
    assert view.tokens.data.tobytes() == tokens.data
    assert view.tokens.scales.tobytes() == tokens.scales
    assert view.expert_ids.tobytes() == message.expert_ids
    assert view.expert_weights.tobytes() == message.expert_weights
    # the worker decodes the in-place view exactly as the message
    x, scales = tf.decode_tokens(view.tokens)
    want, want_scales = tf.decode_tokens(tokens)
    assert torch.equal(x.view(torch.uint8), want.view(torch.uint8))
    assert (scales is None) == (want_scales is None)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, seconds=st.floats(0, 10), fmt=st.sampled_from([tf.FP32, tf.BF16]))
def test_response_bytes_are_protobufs_both_ways(seed, seconds, fmt):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(int(torch.randint(1, 20, (1,), generator=gen)), 192, generator=gen)
    message = expert_pb2.ExpertForwardResponse(
        result=tf.encode_result(rows, fmt), compute_seconds=seconds
    )
    result = message.result
    ours = wire.encode_forward_response(fmt, result.num_tokens, result.hidden, result.data, seconds)
    assert ours == message.SerializeToString()
    view = wire.decode_forward_response(message.SerializeToString())
    assert view.compute_seconds == seconds
    assert (view.result.format, view.result.num_tokens, view.result.hidden) == (
        fmt,
        rows.shape[0],
        192,
    )
    assert view.result.data.tobytes() == result.data


def test_reading_skips_unknown_fields_and_refuses_truncated_messages():
    message = expert_pb2.ExpertForwardResponse(
        result=tf.encode_result(torch.ones(2, 4), tf.FP32), compute_seconds=0.5
    )
    raw = message.SerializeToString()
    # unknown fields of every wire type, before the known ones: varint 9, fixed32 10, bytes 11
    extra = bytes([9 << 3 | 0, 150, 1, 10 << 3 | 5, 1, 2, 3, 4, 11 << 3 | 2, 2, 7, 7])
    view = wire.decode_forward_response(extra + raw)
    assert view.compute_seconds == 0.5 and view.result.data.tobytes() == message.result.data
    for cut in (1, 5, len(raw) - 3):
        with pytest.raises(wire.WireError):
            wire.decode_forward_request(raw[:cut] if cut < 3 else raw[:-cut])
    with pytest.raises(wire.WireError):
        wire.decode_forward_response(raw[:-3])
    assert not wire.decode_forward_request(b"").HasField("tokens")


def _plan_reference(ids, weights, owner):
    """{worker: {row: [(expert, weight), ...] in top-k order}} with a plain loop."""
    out = {}
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                out.setdefault(int(owner[e]), {}).setdefault(t, []).append(
                    (e, float(weights[t, j]))
                )
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    tokens=st.integers(1, 40),
    k=st.integers(1, 8),
    workers=st.integers(1, 5),
    empty=st.floats(0, 0.5),
)
def test_plan_sends_each_token_once_per_worker_with_its_slots_in_order(
    seed, tokens, k, workers, empty
):
    gen = torch.Generator().manual_seed(seed)
    experts = 16
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    ids[torch.rand(tokens, k, generator=gen) < empty] = -1
    weights = torch.rand(tokens, k, generator=gen)
    owner = torch.randint(0, workers, (experts,), generator=gen)
    want = _plan_reference(ids, weights, owner)
    plans = plan_dispatch(ids, weights, owner)
    assert [p.worker for p in plans] == sorted(want)
    for plan in plans:
        rows = want[plan.worker]
        assert plan.rows.tolist() == sorted(rows)
        assert plan.expert_ids.shape[1] == max(len(v) for v in rows.values())
        assert plan.expert_ids.dtype == torch.int64 and plan.weights.dtype == torch.float32
        for i, row in enumerate(plan.rows.tolist()):
            got = [
                (int(e), float(w))
                for e, w in zip(plan.expert_ids[i], plan.weights[i], strict=True)
                if e >= 0
            ]
            assert got == [(e, pytest.approx(w)) for e, w in rows[row]]
            assert plan.weights[i][plan.expert_ids[i] < 0].eq(0).all()


def test_split_plan_keeps_rows_in_order():
    plan = WorkerPlan(2, torch.arange(10) * 3, torch.arange(20).view(10, 2), torch.rand(10, 2))
    parts = split_plan(plan, 4)
    assert [p.rows.numel() for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat([p.rows for p in parts]), plan.rows)
    assert torch.equal(torch.cat([p.expert_ids for p in parts]), plan.expert_ids)
    assert all(p.worker == 2 for p in parts)
    assert split_plan(plan, 10) == [plan]


@pytest.mark.parametrize("precision", list(Precision))
def test_staged_tokens_are_encode_tokens_bytes(precision):
    x = torch.randn(9, 300) * 3
    rows = torch.tensor([7, 0, 3, 3])
    tokens = WireTokens.of(x, precision)
    data, scales = tokens.stage(rows)
    want = tf.encode_tokens(x[rows], precision)
    assert tokens.format == want.format
    assert data.numpy().tobytes() == want.data
    assert (b"" if scales is None else scales.numpy().tobytes()) == want.scales
    assert tokens.row_bytes * len(rows) == len(want.data) + len(want.scales)
    assert np.frombuffer(want.data, np.uint8).size == data.numel()
