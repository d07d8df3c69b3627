"""The worker's raw-bytes Forward path (`expert_worker.wire_forward`, served by every worker):
it answers exactly what the protobuf path (`service.forward`) answers, refuses what it refuses,
and a malformed message is INVALID_ARGUMENT that leaves the worker serving."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from expert_worker import service, wire_forward
from expert_worker.experts import ExpertShard
from expert_worker.server import start_server
from moe_core import token_format as tf
from moe_core import wire
from protos import expert_pb2, expert_pb2_grpc

MODEL = "qwen3_moe"  # hidden 64, 16 experts, MoE layers 0 and 2
HELD = list(range(8, 16))


def _request(precision: str, result: int, seed: int = 0, layer: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 64, generator=gen) * 3
    ids = torch.tensor(HELD)[torch.randint(0, 8, (5, 2), generator=gen)]
    ids[0, 1] = -1
    return expert_pb2.ExpertForwardRequest(
        layer=layer,
        tokens=tf.encode_tokens(x, precision),
        slots=2,
        expert_ids=tf.pack_expert_ids(ids),
        expert_weights=tf.pack_expert_weights(torch.rand(5, 2, generator=gen)),
        result_format=result,
    )


@pytest.mark.parametrize(("precision", "result"), [("fp32", tf.FP32), ("fp8", tf.BF16)])
def test_raw_path_answers_what_the_protobuf_path_answers(checkpoints, precision, result):
    shard = ExpertShard.load(checkpoints.get(MODEL), HELD, precision, progress=False)
    request = _request(precision, result)
    raw = wire_forward.forward_bytes(shard, request.SerializeToString())
    got = expert_pb2.ExpertForwardResponse.FromString(raw)
    want = service.forward(shard, request)
    assert got.result == want.result  # format, shape and every byte of the rows
    assert got.compute_seconds > 0


def test_raw_path_refuses_what_the_protobuf_path_refuses(checkpoints):
    shard = ExpertShard.load(checkpoints.get(MODEL), HELD, "fp32", progress=False)
    for bad in (
        _request("fp32", tf.FP32, layer=1),  # a dense layer
        _request("bf16", tf.FP32),  # tokens in another format
        expert_pb2.ExpertForwardRequest(layer=2, slots=1),  # no tokens
    ):
        with pytest.raises(service.RequestError) as want:
            service.forward(shard, bad)
        with pytest.raises(service.RequestError) as got:
            wire_forward.forward_bytes(shard, bad.SerializeToString())
        assert (got.value.code, got.value.message) == (want.value.code, want.value.message)
    with pytest.raises(service.RequestError, match="not a valid protobuf message") as err:
        wire_forward.forward_bytes(shard, b"\x12\xff\xff\x01")  # tokens claim more bytes
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_served_worker_refuses_a_malformed_message_and_keeps_serving(checkpoints):
    shard = ExpertShard.load(checkpoints.get(MODEL), HELD, "fp32", progress=False)

    async def main():
        server, port, _ = await start_server(shard, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                raw_forward = channel.unary_unary(wire.FORWARD_METHOD)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw_forward(b"\x12\x05\x08", timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "not a valid protobuf message" in err.value.details()
                stub = expert_pb2_grpc.ExpertServiceStub(channel)
                reply = await stub.Forward(_request("fp32", tf.FP32), timeout=10)
                assert reply.result.num_tokens == 5
                info = await stub.GetInfo(expert_pb2.WorkerInfoRequest(), timeout=10)
                assert list(info.expert_ids) == HELD
        finally:
            await server.stop(None)

    asyncio.run(main())
