"""`AsyncClient`: the asyncio twin of `Client`, for use inside a running event loop.

    async with AsyncClient("127.0.0.1:50051") as client:
        result = await client.generate(token_ids=[1, 2, 3])
        async for chunk in client.stream(prompt="Hello"):
            print(chunk.token_ids)

Every failed call raises `moe_client.ClusterError` carrying the router's `.code`
(a grpc.StatusCode) and `.details`; bad arguments raise ValueError before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import numpy as np

from moe_client import connection, messages
from moe_client.types import GenerateChunk, GenerateResult, Scores
from protos import router_pb2, router_pb2_grpc


class AsyncClient:
    """A connection to one router at `address` ("host:port"); create it inside the event loop.

    The same arguments as `Client`: timeout, tls, tls_ca, tls_server_name, token, token_file.
    """

    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        *,
        tls: bool = False,
        tls_ca: str | os.PathLike | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        token_file: str | os.PathLike | None = None,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.address = address
        self.timeout = timeout
        self._metadata = connection.call_metadata(token, token_file)
        self._channel = connection.open_channel(address, tls, tls_ca, tls_server_name, aio=True)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._has_tokenizer: bool | None = None  # learnt from the first info() answer

    async def info(self) -> dict:
        """The model and the workers behind the router; the same dict as `Client.info`."""
        try:
            info = await self._stub.GetInfo(
                router_pb2.ClusterInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        self._has_tokenizer = info.has_tokenizer
        return messages.info_dict(info)

    async def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits: float32 [len(token_ids), vocab_size].

        Row i holds the next-token logits after token_ids[0..i]. Raises ClusterError
        (UNAVAILABLE) when experts had to be left out; `score` returns those logits flagged.
        """
        return messages.exact_logits(await self.score(token_ids))

    async def score(self, token_ids) -> Scores:
        """Teacher-forced logits with the experts left out of their routing (degrade mode)."""
        request = messages.logits_request(token_ids)
        try:
            response = await self._stub.Logits(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        return messages.scores(response)

    async def generate(
        self,
        prompt: str | None = None,
        token_ids=None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerateResult:
        """Generates up to max_new_tokens; the same arguments as `Client.generate`."""
        stream = self.stream(
            prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos
        )
        return messages.join_chunks([chunk async for chunk in stream])

    def stream(
        self,
        prompt: str | None = None,
        token_ids=None,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
    ) -> AsyncIterator[GenerateChunk]:
        """An async iterator of GenerateChunks (`async for chunk in client.stream(...)`).

        Arguments are checked now (ValueError); leaving the loop early cancels the generation.
        """
        request = messages.generate_request(
            prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos
        )
        return self._chunks(request)

    async def _chunks(self, request: router_pb2.GenerateRequest) -> AsyncIterator[GenerateChunk]:
        has_tokenizer = True if request.prompt else await self._knows_tokenizer()
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            async for message in call:
                yield messages.chunk(message, has_tokenizer)
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        finally:
            call.cancel()  # no-op once the stream has ended

    async def _knows_tokenizer(self) -> bool:
        if self._has_tokenizer is None:
            await self.info()
        return bool(self._has_tokenizer)

    async def close(self) -> None:
        """Closes the connection; calls in flight are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
