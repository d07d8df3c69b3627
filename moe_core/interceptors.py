"""Server interceptors every moe-cluster server installs on its own service (one job each).

Both act only on the methods of the server's own service (`/moe_cluster.v1.RouterService/...`,
`/moe_cluster.v1.ExpertService/...`); health and reflection pass through untouched, so that a
draining server still answers health checks with NOT_SERVING.

- `RejectMalformed`: a request whose bytes do not parse as its message type is answered
  INVALID_ARGUMENT naming the type (grpc's own answer to a request it cannot parse is UNKNOWN).
- `Drain`: counts the calls in flight; after `begin()` new calls are refused with UNAVAILABLE
  while those in flight finish, and `wait_idle` tells when none is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import grpc


def _method_name(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _rewrap(handler: grpc.RpcMethodHandler, around, deserializer=None) -> grpc.RpcMethodHandler:
    """The same method with its behaviour wrapped by around(behaviour, streaming) and,
    if given, another request deserializer. Methods with a request stream are returned as they
    are (the services here have none)."""
    deserializer = deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            around(handler.unary_unary, False),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            around(handler.unary_stream, True),
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler


class _ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method of one service once (handlers are cached per method)."""

    def __init__(self, service_name: str) -> None:
        self._prefix = f"/{service_name}/"
        # method -> (the handler wrapped, its wrapper)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(self._prefix):
            return handler
        # wrapped once per method, again if an inner interceptor answers with another handler
        # (e.g. the token check's refusal): a wrapper must never serve a handler it did not wrap
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, self._wrap(_method_name(method), handler))
            self._wrapped[method] = cached
        return cached[1]

    def _wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class _Malformed:
    """What the guarded deserializer returns for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


class RejectMalformed(_ServiceInterceptor):
    """Requests that do not parse are answered INVALID_ARGUMENT, before the servicer runs."""

    def _wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        if parse is None:  # raw bytes: nothing to parse
            return handler

        def guarded(data: bytes):
            try:
                return parse(data)
            except Exception as err:  # DecodeError, and anything else a parser may raise
                return _Malformed(err)

        async def refuse(request: _Malformed, context) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name}: the request is not a valid protobuf message: {request.error}",
            )

        def around(behaviour, streaming: bool):
            if streaming:

                async def stream(request, context):
                    if isinstance(request, _Malformed):
                        await refuse(request, context)
                    async with contextlib.aclosing(behaviour(request, context)) as items:
                        async for item in items:
                            yield item

                return stream

            async def unary(request, context):
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await behaviour(request, context)

            return unary

        return _rewrap(handler, around, guarded)


class Drain(_ServiceInterceptor):
    """Counts the service's calls in flight; once draining, refuses new ones with UNAVAILABLE."""

    def __init__(self, service_name: str) -> None:
        super().__init__(service_name)
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self) -> None:
        """From now on new calls are refused; those in flight go on."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Waits up to timeout_s for the calls in flight to end; True when none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _enter(self, name: str, context) -> None:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{name}: the server is shutting down")
        self.in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def _wrap(self, name: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def around(behaviour, streaming: bool):
            if streaming:

                async def stream(request, context):
                    await self._enter(name, context)
                    try:
                        async with contextlib.aclosing(behaviour(request, context)) as items:
                            async for item in items:
                                yield item
                    finally:
                        self._exit()

                return stream

            async def unary(request, context):
                await self._enter(name, context)
                try:
                    return await behaviour(request, context)
                finally:
                    self._exit()

            return unary

        return _rewrap(handler, around)
