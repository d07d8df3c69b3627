"""Token activations on the wire: `TokenBatch` encoding per `Precision`, plus routing fields.

Layouts follow protos/expert.proto: little-endian, row-major `[num_tokens, hidden]` data in the
format's element type, and for FP8 a `[num_tokens, ceil(hidden / 128)]` float32 scale table.
Routing fields of an `ExpertForwardRequest` are `[num_tokens, slots]` int32 ids (-1 = empty slot)
and float32 weights.

Encoding copies each tensor once (device -> host bytes); decoding copies the received bytes once
into a writable host tensor (pinned when the asked device is a GPU), then moves it there. Every
malformed batch raises `WireFormatError` naming what is wrong.
"""

import sys

import numpy as np
import torch

from moe_core.fp8 import FP8_DTYPE, dequantize_tokens, num_blocks, quantize_tokens
from moe_core.precision import Precision
from protos import expert_pb2

if sys.byteorder != "little":  # the wire is little-endian and tensors are sent as raw memory
    raise ImportError("moe_core.token_format needs a little-endian host")

FP32 = expert_pb2.TOKEN_FORMAT_FP32
BF16 = expert_pb2.TOKEN_FORMAT_BF16
FP8 = expert_pb2.TOKEN_FORMAT_FP8

# format -> element dtype of `data`
_DTYPES: dict[int, torch.dtype] = {FP32: torch.float32, BF16: torch.bfloat16, FP8: FP8_DTYPE}
_TOKEN_FORMATS = {Precision.FP32: FP32, Precision.BF16: BF16, Precision.FP8: FP8}
_RESULT_FORMATS = {Precision.FP32: FP32, Precision.BF16: BF16, Precision.FP8: BF16}


class WireFormatError(ValueError):
    """A TokenBatch or routing field that does not match its declared layout."""


def format_name(fmt: int) -> str:
    """`TOKEN_FORMAT_FP8` for 3; `unknown format 7` for values outside the enum."""
    try:
        return expert_pb2.TokenFormat.Name(fmt)
    except ValueError:
        return f"unknown format {fmt}"


def token_format(precision: Precision | str) -> int:
    """The TokenFormat of dispatched tokens at `precision`: FP32, BF16 or FP8."""
    return _TOKEN_FORMATS[Precision(precision)]


def result_format(precision: Precision | str) -> int:
    """The TokenFormat of expert results at `precision`: FP32 for fp32, BF16 otherwise."""
    return _RESULT_FORMATS[Precision(precision)]


# ---------------------------------------------------------------------------------------------
# raw bytes <-> tensors


def _to_bytes(x: torch.Tensor) -> bytes:
    """The raw little-endian memory of x in C order (one copy)."""
    return x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_nbytes(data, dtype: torch.dtype, shape: tuple[int, ...], what: str) -> None:
    """WireFormatError unless data holds exactly the bytes of a [shape] dtype tensor."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = 1
    for n in shape:
        count *= n
    nbytes = memoryview(data).nbytes
    if nbytes != count * itemsize:
        raise WireFormatError(
            f"{what}: expected {count * itemsize} bytes ({' x '.join(map(str, shape))} "
            f"{str(dtype).removeprefix('torch.')}), got {nbytes}"
        )


def _from_bytes(
    data: bytes | memoryview,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    what: str,
    pin: bool = False,
) -> torch.Tensor:
    """One copy of data into a writable host tensor (pinned with pin, for asynchronous
    transfers to a GPU). data: bytes or a byte memoryview (e.g. into a received message)."""
    _check_nbytes(data, dtype, shape, what)
    host = torch.empty(memoryview(data).nbytes, dtype=torch.uint8, pin_memory=pin)
    host.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return host.view(dtype).view(shape)


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """Where x is NaN or infinite: a bool tensor of x's shape, on x's device (no sync)."""
    if x.dtype == FP8_DTYPE:  # float8_e4m3fn has no infinities and isfinite does not take it
        return (x.view(torch.uint8) & 0x7F) == 0x7F  # its NaN is S.1111.111
    return ~torch.isfinite(x)


def require_finite(x: torch.Tensor, what: str) -> None:
    """WireFormatError naming the first NaN/Inf of x [T, H] (one sync when x is on a GPU)."""
    bad = nonfinite(x)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise WireFormatError(f"{what}: non-finite value at row {row}, column {col}")


def _check_matrix(x: torch.Tensor, what: str) -> None:
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise WireFormatError(f"{what}: expected a non-empty [T, H] tensor, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------
# token batches


def encode_tokens(x: torch.Tensor, precision: Precision | str) -> expert_pb2.TokenBatch:
    """[T, H] float tensor (any device, any float dtype) -> TokenBatch in precision's format.

    fp32 -> FP32 (float32 data), bf16 -> BF16 (bfloat16 data), fp8 -> FP8 (float8_e4m3fn data
    and `quantize_tokens` float32 scales [T, ceil(H / 128)]).
    """
    _check_matrix(x, "tokens")
    fmt = token_format(precision)
    num_tokens, hidden = x.shape
    batch = expert_pb2.TokenBatch(format=fmt, num_tokens=num_tokens, hidden=hidden)
    if fmt == FP8:
        x8, scales = quantize_tokens(x)
        batch.data, batch.scales = _to_bytes(x8), _to_bytes(scales)
    else:
        batch.data = _to_bytes(x.to(_DTYPES[fmt]))
    return batch


def _check_batch(batch: expert_pb2.TokenBatch) -> None:
    """WireFormatError for a batch that is not a token format, is empty, or carries scales it
    should not (its byte lengths are checked where they are read)."""
    if batch.format not in _DTYPES:
        raise WireFormatError(f"tokens: {format_name(batch.format)} is not a token format")
    if batch.num_tokens == 0 or batch.hidden == 0:
        raise WireFormatError(
            f"tokens: empty batch (num_tokens={batch.num_tokens}, hidden={batch.hidden})"
        )
    if batch.format != FP8 and batch.scales:
        raise WireFormatError(
            f"tokens: {format_name(batch.format)} carries no scales, got {len(batch.scales)} bytes"
        )


def token_dtype(fmt: int) -> torch.dtype:
    """The element dtype of a token format's data."""
    return _DTYPES[fmt]


def decode_tokens(
    batch: expert_pb2.TokenBatch,
    device: torch.device | str = "cpu",
    check_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """TokenBatch -> (x, scales) on device.

    x: [T, H] float32 (FP32), bfloat16 (BF16) or float8_e4m3fn (FP8); scales: [T, ceil(H / 128)]
    float32 for FP8, None otherwise. With check_finite, NaN/Inf in x or scales is an error.
    (`host_tokens` reads the bytes in place instead.)
    """
    _check_batch(batch)
    fmt = batch.format
    shape = (batch.num_tokens, batch.hidden)
    device = torch.device(device)
    pin = device.type == "cuda"  # pinned host copies go to the GPU without a synchronization
    what = f"tokens ({format_name(fmt)})"
    x = _from_bytes(batch.data, _DTYPES[fmt], shape, what, pin)
    scales = None
    if fmt == FP8:
        scale_shape = (batch.num_tokens, num_blocks(batch.hidden))
        what = "tokens (FP8 scales)"
        scales = _from_bytes(batch.scales, torch.float32, scale_shape, what, pin)
    if device.type != "cpu":
        x = x.to(device, non_blocking=pin)
        scales = None if scales is None else scales.to(device, non_blocking=pin)
    if check_finite:  # on the device: one elementwise pass and a sync there
        require_finite(x, "tokens")
        if scales is not None:
            require_finite(scales, "tokens (FP8 scales)")
    return x, scales


def host_tokens(batch: expert_pb2.TokenBatch) -> tuple[np.ndarray, np.ndarray | None]:
    """TokenBatch -> its bytes read in place (no copy): data as uint8 [T, H * itemsize] and, for
    FP8, scales as float32 [T, ceil(H / 128)] (None otherwise). Errors as `decode_tokens`."""
    _check_batch(batch)
    fmt, num_tokens = batch.format, batch.num_tokens
    what = f"tokens ({format_name(fmt)})"
    _check_nbytes(batch.data, _DTYPES[fmt], (num_tokens, batch.hidden), what)
    data = np.frombuffer(batch.data, dtype=np.uint8).reshape(num_tokens, -1)
    if fmt != FP8:
        return data, None
    scale_shape = (num_tokens, num_blocks(batch.hidden))
    _check_nbytes(batch.scales, torch.float32, scale_shape, "tokens (FP8 scales)")
    return data, np.frombuffer(batch.scales, dtype=np.float32).reshape(scale_shape)


def tokens_to_float(x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded tokens -> [T, H] float32: FP8 data is multiplied by its per-128-channel scales."""
    if x.dtype == FP8_DTYPE:
        if scales is None:
            raise WireFormatError("tokens: float8_e4m3fn data needs scales")
        try:
            return dequantize_tokens(x, scales)
        except ValueError as err:
            raise WireFormatError(f"tokens: {err}") from err
    return x.float()


# ---------------------------------------------------------------------------------------------
# results


def encode_result(x: torch.Tensor, fmt: int) -> expert_pb2.TokenBatch:
    """[T, H] float32 result rows -> TokenBatch in fmt: FP32 or BF16 (FP8 is not for results)."""
    _check_matrix(x, "result")
    if fmt not in (FP32, BF16):
        raise WireFormatError(f"result: {format_name(fmt)} is not a result format (FP32 or BF16)")
    num_tokens, hidden = x.shape
    data = _to_bytes(x.to(_DTYPES[fmt]))
    return expert_pb2.TokenBatch(format=fmt, num_tokens=num_tokens, hidden=hidden, data=data)


def decode_result(
    batch: expert_pb2.TokenBatch, device: torch.device | str = "cpu", check_finite: bool = False
) -> torch.Tensor:
    """TokenBatch of result rows (FP32 or BF16) -> [T, H] float32 on device."""
    if batch.format not in (FP32, BF16):
        raise WireFormatError(
            f"result: {format_name(batch.format)} is not a result format (FP32 or BF16)"
        )
    x, _ = decode_tokens(batch, device, check_finite)
    return x.float()


# ---------------------------------------------------------------------------------------------
# routing fields of ExpertForwardRequest


def pack_expert_ids(ids: torch.Tensor) -> bytes:
    """[T, S] integer expert ids (-1 = empty slot) -> int32 bytes."""
    if ids.dim() != 2:
        raise WireFormatError(f"expert_ids: expected [T, S], got {tuple(ids.shape)}")
    return _to_bytes(ids.to(torch.int32))


def unpack_expert_ids(data: bytes, num_tokens: int, slots: int) -> torch.Tensor:
    """int32 bytes -> [T, S] int64 ids; the byte length must be exactly T * S * 4."""
    if num_tokens == 0 or slots == 0:
        raise WireFormatError(f"expert_ids: empty [T, S] = [{num_tokens}, {slots}]")
    return _from_bytes(data, torch.int32, (num_tokens, slots), "expert_ids (int32)").long()


def host_routing(
    expert_ids: bytes, expert_weights: bytes, num_tokens: int, slots: int
) -> tuple[np.ndarray, np.ndarray]:
    """The routing fields read in place (no copy): int32 ids [T, S] and float32 weights [T, S].
    Errors as `unpack_expert_ids` and `unpack_expert_weights` (finiteness is not checked)."""
    for what, data, dtype in (
        ("expert_ids", expert_ids, torch.int32),
        ("expert_weights", expert_weights, torch.float32),
    ):
        if num_tokens == 0 or slots == 0:
            raise WireFormatError(f"{what}: empty [T, S] = [{num_tokens}, {slots}]")
        name = f"{what} ({str(dtype).removeprefix('torch.')})"
        _check_nbytes(data, dtype, (num_tokens, slots), name)
    shape = (num_tokens, slots)
    ids = np.frombuffer(expert_ids, dtype=np.int32).reshape(shape)
    return ids, np.frombuffer(expert_weights, dtype=np.float32).reshape(shape)


def pack_expert_weights(weights: torch.Tensor) -> bytes:
    """[T, S] routing weights -> float32 bytes."""
    if weights.dim() != 2:
        raise WireFormatError(f"expert_weights: expected [T, S], got {tuple(weights.shape)}")
    return _to_bytes(weights.to(torch.float32))


def unpack_expert_weights(
    data: bytes, num_tokens: int, slots: int, check_finite: bool = True
) -> torch.Tensor:
    """float32 bytes -> [T, S] float32 weights; NaN/Inf is an error unless check_finite=False."""
    if num_tokens == 0 or slots == 0:
        raise WireFormatError(f"expert_weights: empty [T, S] = [{num_tokens}, {slots}]")
    shape = (num_tokens, slots)
    weights = _from_bytes(data, torch.float32, shape, "expert_weights (float32)")
    if check_finite:
        require_finite(weights, "expert_weights")
    return weights
