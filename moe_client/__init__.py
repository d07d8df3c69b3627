"""Python SDK of moe-cluster: talk to a router over gRPC (needs grpcio, protobuf and numpy only).

    from moe_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate(prompt="Hello", max_new_tokens=8).text)

Against a secured router: `Client(address, tls_ca="ca.crt", token_file="token")` (TLS verified
against that CA, the bearer token on every call; see `moe_client.connection`).
`AsyncClient` offers the same calls for asyncio. Failed calls raise `ClusterError` (`.code`, a
grpc.StatusCode, and `.details`); bad arguments raise ValueError before anything is sent.
"""

from moe_client.async_client import AsyncClient
from moe_client.client import Client
from moe_client.types import ClusterError, GenerateChunk, GenerateResult, Scores

__all__ = ["AsyncClient", "Client", "ClusterError", "GenerateChunk", "GenerateResult", "Scores"]
