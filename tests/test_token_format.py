"""Token batches on the wire: every precision round-trips, every malformed batch is refused."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_core import token_format as tf
from moe_core.fp8 import quantize_tokens
from moe_core.precision import Precision
from protos import expert_pb2

shapes = st.tuples(st.integers(1, 9), st.integers(1, 300))  # hidden crosses 128-channel blocks
seeds = st.integers(0, 2**31 - 1)


def _tokens(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * 10.0 ** torch.randint(-3, 4, (1,), generator=gen)


def _wire(batch: expert_pb2.TokenBatch) -> expert_pb2.TokenBatch:
    return expert_pb2.TokenBatch.FromString(batch.SerializeToString())


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_fp32_round_trip_is_exact(shape, seed):
    x = _tokens(shape, seed)
    batch = _wire(tf.encode_tokens(x, Precision.FP32))
    assert (batch.format, batch.num_tokens, batch.hidden) == (tf.FP32, *shape)
    assert batch.scales == b""
    y, scales = tf.decode_tokens(batch)
    assert scales is None and y.dtype == torch.float32
    assert torch.equal(y, x)
    assert torch.equal(tf.tokens_to_float(y, scales), x)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_bf16_round_trip_is_exact_on_bf16_values(shape, seed):
    x = _tokens(shape, seed).to(torch.bfloat16)
    y, scales = tf.decode_tokens(_wire(tf.encode_tokens(x, "bf16")))
    assert scales is None and y.dtype == torch.bfloat16
    assert torch.equal(y, x)
    # float32 input is rounded to bfloat16 once, as .to(bfloat16) does
    x32 = _tokens(shape, seed + 1)
    y32, _ = tf.decode_tokens(_wire(tf.encode_tokens(x32, Precision.BF16)))
    assert torch.equal(y32, x32.to(torch.bfloat16))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_fp8_round_trip_equals_quantize_tokens(shape, seed):
    x = _tokens(shape, seed)
    batch = _wire(tf.encode_tokens(x, Precision.FP8))
    assert batch.format == tf.FP8
    assert len(batch.data) == shape[0] * shape[1]
    assert len(batch.scales) == shape[0] * math.ceil(shape[1] / 128) * 4
    y, scales = tf.decode_tokens(batch)
    want_x8, want_scales = quantize_tokens(x)
    assert y.dtype == torch.float8_e4m3fn
    assert torch.equal(y.view(torch.uint8), want_x8.view(torch.uint8))  # every element, bitwise
    assert torch.equal(scales, want_scales)
    # dequantized: within half an e4m3 step (2^-4 relative), or half the smallest subnormal step
    # (2^-10) of the element's 128-channel block scale
    block_scale = want_scales.repeat_interleave(128, 1)[:, : shape[1]]
    err = (tf.tokens_to_float(y, scales) - x).abs()
    assert bool((err <= (x.abs() * 2**-4 + block_scale * 2**-10) * 1.0001).all())


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=seeds)
def test_results_round_trip(shape, seed):
    x = _tokens(shape, seed)
    exact = tf.decode_result(_wire(tf.encode_result(x, tf.FP32)))
    assert exact.dtype == torch.float32 and torch.equal(exact, x)
    rounded = tf.decode_result(_wire(tf.encode_result(x, tf.BF16)))
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, x.to(torch.bfloat16).float())


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 20), st.integers(1, 8)), seed=seeds)
def test_routing_fields_round_trip(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 256, shape, generator=gen)
    weights = torch.rand(shape, generator=gen)
    assert torch.equal(tf.unpack_expert_ids(tf.pack_expert_ids(ids), *shape), ids)
    assert torch.equal(tf.unpack_expert_weights(tf.pack_expert_weights(weights), *shape), weights)


def test_formats_of_precisions():
    assert [tf.token_format(p) for p in ("fp32", "bf16", "fp8")] == [tf.FP32, tf.BF16, tf.FP8]
    assert [tf.result_format(p) for p in ("fp32", "bf16", "fp8")] == [tf.FP32, tf.BF16, tf.BF16]


def _batch(fmt=tf.FP32, num_tokens=2, hidden=4, data=None, scales=b""):
    itemsize = {tf.FP32: 4, tf.BF16: 2, tf.FP8: 1}.get(fmt, 4)
    if data is None:
        data = bytes(num_tokens * hidden * itemsize)
    return expert_pb2.TokenBatch(
        format=fmt, num_tokens=num_tokens, hidden=hidden, data=data, scales=scales
    )


def _nan_bytes(fmt) -> bytes:
    dtype = {tf.FP32: torch.float32, tf.BF16: torch.bfloat16}[fmt]
    x = torch.zeros(2, 4, dtype=dtype)
    x[1, 2] = float("nan")
    return x.view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    "batch, message",
    [
        (_batch(fmt=expert_pb2.TOKEN_FORMAT_UNSPECIFIED), "TOKEN_FORMAT_UNSPECIFIED is not"),
        (_batch(fmt=9, data=b""), "unknown format 9"),
        (_batch(num_tokens=0, data=b""), "empty batch (num_tokens=0"),
        (_batch(hidden=0, data=b""), "empty batch"),
        (_batch(data=bytes(31)), "expected 32 bytes (2 x 4 float32), got 31"),
        (_batch(fmt=tf.BF16, data=bytes(32)), "expected 16 bytes (2 x 4 bfloat16), got 32"),
        (_batch(fmt=tf.FP8, scales=bytes(4)), "FP8 scales): expected 8 bytes (2 x 1 float32)"),
        (_batch(fmt=tf.FP8, hidden=129, scales=bytes(8)), "expected 16 bytes (2 x 2 float32)"),
        (_batch(scales=bytes(8)), "TOKEN_FORMAT_FP32 carries no scales, got 8 bytes"),
    ],
)
def test_malformed_token_batches_are_refused(batch, message):
    with pytest.raises(tf.WireFormatError) as info:
        tf.decode_tokens(_wire(batch))
    assert message in str(info.value)


@pytest.mark.parametrize("fmt", [tf.FP32, tf.BF16])
def test_non_finite_tokens_are_refused_when_checked(fmt):
    batch = _batch(fmt=fmt, data=_nan_bytes(fmt))
    x, _ = tf.decode_tokens(batch)  # unchecked: passed through
    assert bool(x[1, 2].isnan())
    with pytest.raises(tf.WireFormatError, match=r"non-finite value at row 1, column 2"):
        tf.decode_tokens(batch, check_finite=True)


def test_fp8_nan_and_bad_scales_are_refused_when_checked():
    data = bytearray(8)
    data[5] = 0x7F  # float8_e4m3fn NaN at row 1, column 1
    scales = torch.ones(2, 1).numpy().tobytes()
    with pytest.raises(tf.WireFormatError, match=r"tokens: non-finite value at row 1, column 1"):
        tf.decode_tokens(_batch(fmt=tf.FP8, data=bytes(data), scales=scales), check_finite=True)
    inf_scales = torch.tensor([[1.0], [math.inf]]).numpy().tobytes()
    with pytest.raises(tf.WireFormatError, match=r"FP8 scales\): non-finite value at row 1"):
        tf.decode_tokens(_batch(fmt=tf.FP8, scales=inf_scales), check_finite=True)


def test_malformed_results_are_refused():
    with pytest.raises(tf.WireFormatError, match="TOKEN_FORMAT_FP8 is not a result format"):
        tf.encode_result(torch.zeros(2, 4), tf.FP8)
    with pytest.raises(tf.WireFormatError, match="TOKEN_FORMAT_FP8 is not a result format"):
        tf.decode_result(_batch(fmt=tf.FP8, scales=bytes(8)))
    with pytest.raises(tf.WireFormatError, match=r"result: expected a non-empty \[T, H\]"):
        tf.encode_result(torch.zeros(0, 4), tf.FP32)
    with pytest.raises(tf.WireFormatError, match=r"tokens: expected a non-empty \[T, H\].*\(5,\)"):
        tf.encode_tokens(torch.zeros(5), Precision.FP32)
    with pytest.raises(tf.WireFormatError, match="got 12"):
        tf.decode_result(_batch(data=bytes(12)))


def test_malformed_routing_fields_are_refused():
    with pytest.raises(tf.WireFormatError, match=r"expert_ids \(int32\): expected 24 bytes"):
        tf.unpack_expert_ids(bytes(20), 3, 2)
    with pytest.raises(tf.WireFormatError, match=r"expert_ids: empty \[T, S\] = \[3, 0\]"):
        tf.unpack_expert_ids(b"", 3, 0)
    with pytest.raises(tf.WireFormatError, match=r"expert_weights \(float32\): expected 8 bytes"):
        tf.unpack_expert_weights(bytes(9), 1, 2)
    nan = torch.tensor([[0.5, math.nan]]).numpy().tobytes()
    with pytest.raises(tf.WireFormatError, match=r"expert_weights: non-finite .* row 0, column 1"):
        tf.unpack_expert_weights(nan, 1, 2)
    assert bool(tf.unpack_expert_weights(nan, 1, 2, check_finite=False)[0, 1].isnan())
    with pytest.raises(tf.WireFormatError, match=r"expected \[T, S\], got \(4,\)"):
        tf.pack_expert_ids(torch.zeros(4, dtype=torch.long))


def test_fp8_tokens_need_their_scales():
    x8, _ = quantize_tokens(torch.randn(2, 4))
    with pytest.raises(tf.WireFormatError, match="float8_e4m3fn data needs scales"):
        tf.tokens_to_float(x8, None)
    with pytest.raises(tf.WireFormatError, match="need scales of shape"):
        tf.tokens_to_float(x8, torch.ones(2, 2))


def test_decoded_tensors_are_writable_and_independent_of_the_message():
    batch = tf.encode_tokens(torch.ones(2, 3), Precision.FP32)
    x, _ = tf.decode_tokens(batch)
    x.mul_(2)  # a writable buffer: in-place kernels work on decoded tokens
    assert torch.equal(tf.decode_tokens(batch)[0], torch.ones(2, 3))
