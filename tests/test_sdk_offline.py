"""The client SDK without a cluster: imports without torch, checks arguments, talks to a stand-in.

The stand-in is a small RouterService on 127.0.0.1 whose answers are known in advance, so the
tests see exactly what a user of `Client` / `AsyncClient` gets back from each kind of answer.
"""

import asyncio
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from moe_client import AsyncClient, Client, ClusterError, GenerateChunk, GenerateResult
from protos import router_pb2, router_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 8


class StandInRouter(router_pb2_grpc.RouterServiceServicer):
    """Logits row i = token_ids[i] * 100 + column; Generate yields token_ids reversed, one per
    chunk, stopping with STOP at token 0."""

    def __init__(self) -> None:
        self.has_tokenizer = False
        self.requests: list[router_pb2.GenerateRequest] = []

    def GetInfo(self, request, context):
        return router_pb2.ClusterInfo(
            architecture="qwen3_moe",
            vocab_size=VOCAB,
            precision="fp32",
            workers=[
                router_pb2.WorkerStatus(
                    address="127.0.0.1:7001", experts=[0, 1], healthy=True, expert_tokens={1: 5}
                ),
                router_pb2.WorkerStatus(address="127.0.0.1:7002", experts=[2, 3], healthy=False),
            ],
            num_layers=2,
            num_experts=4,
            top_k=2,
            hidden_size=64,
            has_tokenizer=self.has_tokenizer,
            eos_token_ids=[0],
            model="tiny",
            device="cpu",
        )

    def Logits(self, request, context):
        ids = np.array(request.token_ids, dtype=np.float32)
        if (ids >= VOCAB).any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token id is not below {VOCAB}")
        logits = ids[:, None] * 100 + np.arange(VOCAB, dtype=np.float32)[None, :]
        return router_pb2.LogitsResponse(
            num_tokens=len(ids), vocab_size=VOCAB, logits=logits.astype("<f4").tobytes()
        )

    def Generate(self, request, context):
        self.requests.append(request)
        if request.prompt and not self.has_tokenizer:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model has no tokenizer")
        ids = [len(request.prompt)] if request.prompt else list(request.token_ids)
        out = list(reversed(ids))[: request.max_new_tokens]
        for i, token in enumerate(out):
            last = i == len(out) - 1 or token == 0
            stopped = token == 0
            reason = router_pb2.FINISH_REASON_STOP if stopped else router_pb2.FINISH_REASON_LENGTH
            yield router_pb2.GenerateChunk(
                token_ids=[token],
                text=f"<{token}>" if self.has_tokenizer else "",
                finish_reason=reason if last else router_pb2.FINISH_REASON_UNSPECIFIED,
                prompt_tokens=len(ids),
            )
            if last:
                return


@pytest.fixture(scope="module")
def router():
    servicer = StandInRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@pytest.fixture
def stand_in(router):
    servicer, address = router
    servicer.has_tokenizer = False
    servicer.requests.clear()
    return servicer, address


def test_sdk_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import moe_client\n"
        "from moe_client import Client, AsyncClient, ClusterError\n"
        "Client('127.0.0.1:1').close()\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None]\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of prompt"),
        ({"prompt": "hi", "token_ids": [1]}, "exactly one of prompt"),
        ({"prompt": ""}, "prompt is empty"),
        ({"prompt": b"hi"}, "prompt must be a str"),
        ({"token_ids": []}, "token_ids is empty"),
        ({"token_ids": "abc"}, "sequence of integers"),
        ({"token_ids": [1, -2]}, r"token_ids\[1\] = -2 is not a token id"),
        ({"token_ids": [1, 2.0]}, r"token_ids\[1\] must be an integer"),
        ({"token_ids": [True]}, r"token_ids\[0\] must be an integer"),
        ({"token_ids": [2**32]}, "is not a token id"),
        ({"token_ids": [1], "max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
        ({"token_ids": [1], "temperature": -0.5}, "temperature must be finite and >= 0"),
        ({"token_ids": [1], "temperature": float("nan")}, "temperature must be finite"),
        ({"token_ids": [1], "top_k": -1}, "top_k must be an integer >= 0"),
        ({"token_ids": [1], "top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"token_ids": [1], "top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"token_ids": [1], "seed": -1}, "seed must be None or an integer"),
    ],
)
def test_bad_generation_arguments_raise_before_any_call(kwargs, message):
    # nothing listens on port 1: a ValueError proves the check happened client-side
    with Client("127.0.0.1:1", timeout=5) as client:
        with pytest.raises(ValueError, match=message):
            client.generate(**kwargs)
        with pytest.raises(ValueError, match=message):
            client.stream(**kwargs)  # checked at the call, not at the first next()


def test_bad_logits_arguments_and_timeout_raise():
    with Client("127.0.0.1:1") as client:
        with pytest.raises(ValueError, match="token_ids is empty"):
            client.logits([])
        with pytest.raises(ValueError, match=r"token_ids\[0\] = -1"):
            client.logits(np.array([-1]))
    with pytest.raises(ValueError, match="timeout must be positive"):
        Client("127.0.0.1:1", timeout=0)


def test_unreachable_router_is_a_cluster_error():
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(ClusterError) as info:
        client.info()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert isinstance(info.value.__cause__, grpc.RpcError)


def test_info_is_plain_python(stand_in):
    _, address = stand_in
    with Client(address) as client:
        info = client.info()
    assert info["architecture"] == "qwen3_moe" and info["vocab_size"] == VOCAB
    assert info["precision"] == "fp32" and info["eos_token_ids"] == [0]
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (2, 4, 2)
    assert info["workers"] == [
        {"address": "127.0.0.1:7001", "experts": [0, 1], "healthy": True, "expert_tokens": {1: 5}},
        {"address": "127.0.0.1:7002", "experts": [2, 3], "healthy": False, "expert_tokens": {}},
    ]


def test_logits_are_a_float32_array(stand_in):
    _, address = stand_in
    with Client(address) as client:
        logits = client.logits([3, 1, 4])
    assert logits.dtype == np.float32 and logits.shape == (3, VOCAB)
    assert logits[2, 5] == 405.0 and logits[0, 0] == 300.0
    logits[0, 0] = 1.0  # the caller owns a writable array


def test_generate_and_stream_without_tokenizer(stand_in):
    servicer, address = stand_in
    with Client(address) as client:
        result = client.generate(token_ids=[0, 5, 6], max_new_tokens=9, seed=2**64 - 1, top_k=3)
        assert result == GenerateResult([6, 5, 0], None, "stop", 3)
        assert servicer.requests[-1].seed == 2**64 - 1 and servicer.requests[-1].top_k == 3
        chunks = list(client.stream(token_ids=[4, 5, 6], max_new_tokens=2))
        assert chunks == [GenerateChunk([6], None, None, 3), GenerateChunk([5], None, "length", 3)]
        with pytest.raises(ClusterError) as info:
            client.generate(prompt="hello")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details == "the model has no tokenizer"


def test_generate_with_tokenizer_has_text(stand_in):
    servicer, address = stand_in
    servicer.has_tokenizer = True
    with Client(address) as client:
        assert client.generate(prompt="hey").text == "<3>"
        assert client.generate(token_ids=[1, 2]).text == "<2><1>"


def test_server_errors_keep_their_code_and_details(stand_in):
    _, address = stand_in
    with Client(address) as client, pytest.raises(ClusterError) as info:
        client.logits([1, 99])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details == f"token id is not below {VOCAB}"
    assert "INVALID_ARGUMENT" in str(info.value)


def test_async_client_mirrors_client(stand_in):
    servicer, address = stand_in
    servicer.has_tokenizer = True

    async def session():
        async with AsyncClient(address, timeout=10) as client:
            info = await client.info()
            logits = await client.logits([1, 2])
            result = await client.generate(token_ids=[7, 0, 3], max_new_tokens=5)
            chunks = [chunk async for chunk in client.stream(token_ids=[1, 2], max_new_tokens=8)]
            with pytest.raises(ValueError, match="exactly one of prompt"):
                client.stream()
            with pytest.raises(ClusterError) as error:
                await client.logits([VOCAB])
            return info, logits, result, chunks, error.value

    info, logits, result, chunks, error = asyncio.run(session())
    assert info["has_tokenizer"] is True and len(info["workers"]) == 2
    assert logits.shape == (2, VOCAB) and logits[1, 1] == 201.0
    assert result == GenerateResult([3, 0], "<3><0>", "stop", 3)
    assert chunks == [GenerateChunk([2], "<2>", None, 2), GenerateChunk([1], "<1>", "length", 2)]
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
