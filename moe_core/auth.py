"""Bearer tokens on the wire: metadata `authorization: Bearer <token>` on every call.

Servers check it in `BearerTokenInterceptor`; the router adds it to its calls to the workers with
`BearerTokenCallInterceptor`. Health and reflection stay open (`OPEN_SERVICES`): kubelet probes
send no token, and reflection only describes the public protos. A token never appears in a log
line, an exception or a status message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "Bearer"
# Services any caller may use without a token; every other method needs one.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def check_token(token: str, source: str) -> str:
    """Returns token if it can travel as a metadata value; ValueError naming `source` otherwise.

    A token is one or more visible ASCII characters (0x21-0x7e), no spaces. The message never
    contains the token.
    """
    if not token:
        raise ValueError(f"{source} is empty")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(
            f"{source} holds characters other than visible ASCII (no spaces or control "
            "characters inside a bearer token)"
        )
    return token


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries token: (("authorization", "Bearer <token>"),)."""
    return ((METADATA_KEY, f"{SCHEME} {token}"),)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def token_problem(metadata, token: str) -> str | None:
    """None when `metadata` (pairs of key, value) carries `token`; otherwise why not.

    The comparison takes the same time whatever the token sent (hashes compared with
    hmac.compare_digest).
    """
    sent = next((value for key, value in metadata or () if key == METADATA_KEY), None)
    if sent is None:
        return f"missing bearer token: send metadata '{METADATA_KEY}: {SCHEME} <token>'"
    if isinstance(sent, bytes):
        sent = sent.decode("utf-8", "replace")
    scheme, _, credential = sent.partition(" ")
    if scheme.lower() != SCHEME.lower():
        return f"'{METADATA_KEY}' metadata must be '{SCHEME} <token>'"
    if not hmac.compare_digest(_digest(credential.strip()), _digest(token)):
        return "invalid bearer token"
    return None


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to a call without the server's token, before it reaches a servicer.

    Methods of `OPEN_SERVICES` pass without a token. A rejected call's request is never
    deserialized; the rejection is logged with the method and the peer, never the token.
    """

    def __init__(self, token: str) -> None:
        self._token = check_token(token, "the server's token")

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method  # "/package.Service/Method"
        handler = await continuation(handler_call_details)
        if handler is None or method.lstrip("/").partition("/")[0] in OPEN_SERVICES:
            return handler
        problem = token_problem(handler_call_details.invocation_metadata, self._token)
        if problem is None:
            return handler
        return _rejecting_handler(handler, method, problem)


def _rejecting_handler(handler: grpc.RpcMethodHandler, method: str, problem: str):
    """A handler of the same kind as `handler` that aborts UNAUTHENTICATED with `problem`."""

    async def reject(request_or_iterator, context):
        log.warning("rejected %s from %s: %s", method, context.peer(), problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    # no deserializer: the request of an unauthenticated caller stays unparsed bytes
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(reject)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(reject)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(reject)
    return grpc.unary_unary_rpc_method_handler(reject)


class BearerTokenCallInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds `authorization: Bearer <token>` to every unary-unary call of an aio channel.

    ExpertService has only unary-unary methods. An interceptor rather than call credentials:
    it works on plaintext channels too and costs far less per call (call credentials run a
    Python plugin on another thread for every call).
    """

    def __init__(self, token: str) -> None:
        self._metadata = bearer_metadata(check_token(token, "the token"))

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()), *self._metadata)
        return await continuation(client_call_details._replace(metadata=metadata), request)
