"""Python SDK of moe-cluster: talk to a router over gRPC (needs grpcio, protobuf and numpy only).

    from moe_client import Client
    with Client("127.0.0.1:50051") as client:
        print(client.generate(prompt="Hello", max_new_tokens=8).text)

`AsyncClient` offers the same calls for asyncio. Failed calls raise `ClusterError` (`.code`, a
grpc.StatusCode, and `.details`); bad arguments raise ValueError before anything is sent.
"""

from moe_client.async_client import AsyncClient
from moe_client.client import Client
from moe_client.types import ClusterError, GenerateChunk, GenerateResult

__all__ = ["AsyncClient", "Client", "ClusterError", "GenerateChunk", "GenerateResult"]
