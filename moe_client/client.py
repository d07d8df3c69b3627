"""`Client`: blocking access to a moe-cluster router.

    with Client("127.0.0.1:50051") as client:
        print(client.info()["architecture"])
        result = client.generate(prompt="The capital of France is", max_new_tokens=8)
        for chunk in client.stream(token_ids=[1, 2, 3]):
            print(chunk.token_ids)

Every failed call raises `moe_client.ClusterError` carrying the router's `.code`
(a grpc.StatusCode) and `.details`; bad arguments raise ValueError before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import numpy as np

from moe_client import connection, messages
from moe_client.types import GenerateChunk, GenerateResult, Scores
from protos import router_pb2, router_pb2_grpc


class Client:
    """A connection to one router at `address` ("host:port").

    timeout: deadline in seconds of each call (for stream/generate: of the whole generation);
    None waits as long as it takes. Calls fail fast with UNAVAILABLE when the router is down.

    Security (see `moe_client.connection`): plaintext unless tls=True (system root CAs) or
    tls_ca (a PEM CA bundle: a path or bytes) is given; tls_server_name replaces the host in the
    certificate check. token (or token_file, whose trailing whitespace is stripped) is sent as
    `authorization: Bearer <token>` on every call; a router that wants one answers
    UNAUTHENTICATED without it. A server that TLS cannot verify fails calls with UNAVAILABLE.
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
        self._channel = connection.open_channel(address, tls, tls_ca, tls_server_name, aio=False)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._has_tokenizer: bool | None = None  # learnt from the first info() answer

    def info(self) -> dict:
        """The model and the workers behind the router.

        Keys: architecture, model, vocab_size, precision, device, num_layers, num_experts, top_k,
        hidden_size, has_tokenizer, eos_token_ids; workers: a list of
        {address, experts, healthy, expert_tokens (expert id -> tokens sent)}; load: {kv_slots,
        free_kv_slots, running, waiting} now; limits: {max_seq_len, max_prompt_len,
        max_new_tokens, max_concurrent_requests, max_waiting, max_request_bytes}.
        """
        try:
            info = self._stub.GetInfo(
                router_pb2.ClusterInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        self._has_tokenizer = info.has_tokenizer
        return messages.info_dict(info)

    def logits(self, token_ids) -> np.ndarray:
        """Teacher-forced logits: float32 [len(token_ids), vocab_size].

        Row i holds the next-token logits after token_ids[0..i]. Raises ClusterError
        (UNAVAILABLE) when experts had to be left out; `score` returns those logits flagged.
        """
        return messages.exact_logits(self.score(token_ids))

    def score(self, token_ids) -> Scores:
        """Teacher-forced logits with the experts left out of their routing (degrade mode)."""
        request = messages.logits_request(token_ids)
        try:
            response = self._stub.Logits(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        return messages.scores(response)

    def generate(
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
        """Generates up to max_new_tokens after the prompt (text) or token_ids (give one).

        temperature 0 is greedy; top_k 0 and top_p 1 mean no limit; seed makes sampling
        repeatable; ignore_eos keeps going after an end-of-sequence token.
        """
        chunks = self.stream(
            prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos
        )
        return messages.join_chunks(list(chunks))

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
    ) -> Iterator[GenerateChunk]:
        """Like generate, but yields GenerateChunks as the router produces them.

        Arguments are checked now (ValueError); leaving the loop early cancels the generation.
        """
        request = messages.generate_request(
            prompt, token_ids, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos
        )
        return self._chunks(request)

    def _chunks(self, request: router_pb2.GenerateRequest) -> Iterator[GenerateChunk]:
        has_tokenizer = True if request.prompt else self._knows_tokenizer()
        call = self._stub.Generate(request, timeout=self.timeout, metadata=self._metadata)
        try:
            for message in call:
                yield messages.chunk(message, has_tokenizer)
        except grpc.RpcError as err:
            raise messages.cluster_error(err) from err
        finally:
            call.cancel()  # no-op once the stream has ended

    def _knows_tokenizer(self) -> bool:
        if self._has_tokenizer is None:
            self.info()
        return bool(self._has_tokenizer)

    def close(self) -> None:
        """Closes the connection; calls in flight are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
