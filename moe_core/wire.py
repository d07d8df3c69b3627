"""ExpertService Forward messages as raw protobuf bytes, built and read without protobuf copies.

The bytes are exactly what `protos/expert.proto` defines (tests check them against the protobuf
runtime both ways); only the way they are made differs. Serializing a message that holds tens of
megabytes of tensor data through the protobuf runtime copies the data several times (into the
message, then into a growing output buffer, then into the result); here a request is one
`bytes.join` of small headers and the tensors' host memory, and a response is read in place: its
`data` comes back as a `memoryview` into the received bytes.

Layout (protobuf wire format, little-endian varints; fields in number order, zero scalars and empty
bytes left out as protobuf does):

    ExpertForwardRequest  = layer(1) tokens(2: TokenBatch) slots(3) expert_ids(4) expert_weights(5)
                            result_format(6)
    TokenBatch            = format(1) num_tokens(2) hidden(3) data(4) scales(5)
    ExpertForwardResponse = result(1: TokenBatch) compute_seconds(2: double)

Reading skips fields it does not know, as protobuf does; a message that ends inside a field raises
`WireError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

FORWARD_METHOD = "/moe_cluster.v1.ExpertService/Forward"

Buffer = bytes | bytearray | memoryview  # anything with the buffer protocol, read as bytes

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


class WireError(ValueError):
    """Bytes that are not a well-formed message of the expected type."""


def malformed_forward(err: WireError) -> str:
    """What a worker answers (INVALID_ARGUMENT) to Forward bytes that do not parse."""
    return f"Forward: the request is not a valid protobuf message (ExpertForwardRequest): {err}"


# ---------------------------------------------------------------------------------------------
# writing


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"varints here are unsigned, got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scalar(field: int, value: int) -> bytes:
    return _varint(field << 3 | _VARINT) + _varint(value) if value else b""


def _nbytes(buf: Buffer) -> int:
    return memoryview(buf).nbytes


def _len_prefix(field: int, length: int) -> bytes:
    return _varint(field << 3 | _LEN) + _varint(length)


def _token_batch_parts(
    fmt: int, num_tokens: int, hidden: int, data: Buffer, scales: Buffer | None
) -> list[Buffer]:
    parts: list[Buffer] = [_scalar(1, fmt) + _scalar(2, num_tokens) + _scalar(3, hidden)]
    for field, buf in ((4, data), (5, scales)):
        if buf is not None and _nbytes(buf):
            parts += [_len_prefix(field, _nbytes(buf)), buf]
    return parts


def _embed(field: int, parts: list[Buffer]) -> list[Buffer]:
    """A length-delimited submessage made of parts (always written, even when empty)."""
    return [_len_prefix(field, sum(_nbytes(p) for p in parts)), *parts]


def encode_forward_request(**fields) -> bytes:
    """A serialized ExpertForwardRequest of `forward_request_parts`'s keyword fields: one join,
    which copies each buffer once."""
    return b"".join(forward_request_parts(**fields))


def forward_request_parts(
    layer: int,
    token_format: int,
    num_tokens: int,
    hidden: int,
    data: Buffer,
    scales: Buffer | None,
    slots: int,
    expert_ids: Buffer,
    expert_weights: Buffer,
    result_format: int,
) -> list[Buffer]:
    """A serialized ExpertForwardRequest as the buffers to send in order (empty ones left out):
    small headers, and the tensors' memory uncopied. data/scales/ids/weights are raw
    little-endian tensor memory in the proto's layouts (see token_format)."""
    parts = [_scalar(1, layer)]
    parts += _embed(2, _token_batch_parts(token_format, num_tokens, hidden, data, scales))
    parts.append(_scalar(3, slots))
    for field, buf in ((4, expert_ids), (5, expert_weights)):
        if _nbytes(buf):
            parts += [_len_prefix(field, _nbytes(buf)), buf]
    parts.append(_scalar(6, result_format))
    return [p for p in parts if _nbytes(p)]


def encode_forward_response(
    token_format: int,
    num_tokens: int,
    hidden: int,
    data: Buffer,
    compute_seconds: float,
) -> bytes:
    """A serialized ExpertForwardResponse whose result rows are `data`. Copies data once."""
    parts = _embed(1, _token_batch_parts(token_format, num_tokens, hidden, data, None))
    if compute_seconds:
        parts.append(bytes([2 << 3 | _FIXED64]) + struct.pack("<d", compute_seconds))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# reading


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise WireError("message ends inside a varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


def _fields(buf: memoryview, start: int, end: int):
    """Yields (field number, wire type, value): an int for varints and fixed fields, a (start,
    end) pair for length-delimited ones."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos, end)
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos, end)
            if pos + length > end:
                raise WireError(f"field {field} claims {length} bytes, {end - pos} are left")
            value, pos = (pos, pos + length), pos + length
        elif wire_type in (_FIXED64, _FIXED32):
            size = 8 if wire_type == _FIXED64 else 4
            if pos + size > end:
                raise WireError(f"message ends inside fixed field {field}")
            value, pos = int.from_bytes(buf[pos : pos + size], "little"), pos + size
        else:
            raise WireError(f"field {field} has unsupported wire type {wire_type}")
        yield field, wire_type, value


@dataclass(frozen=True)
class TokenBatchView:
    """A TokenBatch read in place: data and scales are views into the message's bytes."""

    format: int
    num_tokens: int
    hidden: int
    data: memoryview
    scales: memoryview


@dataclass(frozen=True)
class ForwardResponseView:
    result: TokenBatchView
    compute_seconds: float


@dataclass(frozen=True)
class ForwardRequestView:
    """An ExpertForwardRequest read in place; reads like the protobuf message for the fields
    the worker uses (`HasField("tokens")` included), byte fields as memoryviews."""

    layer: int
    tokens: TokenBatchView | None
    slots: int
    expert_ids: memoryview
    expert_weights: memoryview
    result_format: int

    def HasField(self, name: str) -> bool:  # noqa: N802 (the protobuf spelling)
        if name != "tokens":
            raise ValueError(f"ExpertForwardRequest has no submessage field {name!r}")
        return self.tokens is not None


def _token_batch(buf: memoryview, start: int, end: int) -> TokenBatchView:
    scalars = {1: 0, 2: 0, 3: 0}
    spans = {4: (start, start), 5: (start, start)}
    for field, wire_type, value in _fields(buf, start, end):
        if field in scalars and wire_type == _VARINT:
            scalars[field] = value & 0xFFFFFFFF  # uint32 / enum, as protobuf truncates
        elif field in spans and wire_type == _LEN:
            spans[field] = value
    (d0, d1), (s0, s1) = spans[4], spans[5]
    return TokenBatchView(scalars[1], scalars[2], scalars[3], buf[d0:d1], buf[s0:s1])


def decode_forward_request(raw: Buffer) -> ForwardRequestView:
    """Serialized ExpertForwardRequest -> its fields, the byte fields not copied."""
    buf = memoryview(raw).cast("B")
    scalars = {1: 0, 3: 0, 6: 0}
    spans: dict[int, tuple[int, int]] = {}
    for field, wire_type, value in _fields(buf, 0, len(buf)):
        if field in scalars and wire_type == _VARINT:
            scalars[field] = value & 0xFFFFFFFF
        elif field in (2, 4, 5) and wire_type == _LEN:
            spans[field] = value
    tokens = _token_batch(buf, *spans[2]) if 2 in spans else None
    empty = buf[0:0]
    ids, weights = (buf[slice(*spans[f])] if f in spans else empty for f in (4, 5))
    return ForwardRequestView(scalars[1], tokens, scalars[3], ids, weights, scalars[6])


def decode_forward_response(raw: Buffer) -> ForwardResponseView:
    """Serialized ExpertForwardResponse -> its fields, the result's data not copied."""
    buf = memoryview(raw).cast("B")
    span, seconds = None, 0.0
    for field, wire_type, value in _fields(buf, 0, len(buf)):
        if field == 1 and wire_type == _LEN:
            span = value
        elif field == 2 and wire_type == _FIXED64:
            seconds = struct.unpack("<d", value.to_bytes(8, "little"))[0]
    result = _token_batch(buf, *(span or (0, 0)))
    return ForwardResponseView(result, seconds)
