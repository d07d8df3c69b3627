"""The native gRPC client (router.native) against a real Python gRPC server on loopback.

A request made of several buffers arrives as their bytes in order and the reply lands in the
memory given for it; the server's status and details, a deadline, a cancellation, a reply too
large for its memory, a server that is not there and a shutdown with calls under way each end
the call with the right code; request memory is released; TLS with a client certificate, a TLS
name override and call metadata reach the server as the Python client sends them.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest
from native_lib import require_native
from test_security import LOOPBACK, make_pki

from router.native import FINISHED, RELEASED, NativeClient

METHOD = b"/test.Echo/Call"


@pytest.fixture(autouse=True)
def _native():
    require_native()


def _handler(request: bytes, context: grpc.ServicerContext) -> bytes:
    """Echo, reversed; 'fail' aborts, 'slow' sleeps, 'meta' answers the call's metadata."""
    if request.startswith(b"fail"):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "asked to fail")
    if request.startswith(b"slow"):
        time.sleep(float(request[4:]))
    if request == b"meta":
        return ";".join(f"{m.key}={m.value}" for m in context.invocation_metadata()).encode()
    return request[::-1]


def _server(credentials=None) -> tuple[grpc.Server, str]:
    server = grpc.server(
        futures.ThreadPoolExecutor(8),
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    rpc = grpc.unary_unary_rpc_method_handler(_handler)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Echo", {"Call": rpc})]
    )
    address = "127.0.0.1:0"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def echo():
    server, address = _server()
    yield address
    server.stop(None)


@pytest.fixture
def client():
    client = NativeClient()
    yield client
    assert client.shutdown(timeout_s=10)
    client.free()


class _Calls:
    """Starts calls on a client and waits for their events."""

    def __init__(self, client: NativeClient) -> None:
        self.client = client
        self.events: dict[int, set[int]] = {}
        self.keep: list[np.ndarray] = []

    def start(self, channel: int, parts: list[bytes], reply: np.ndarray, timeout_s=10.0) -> int:
        arrays = [np.frombuffer(part, dtype=np.uint8).copy() for part in parts]
        self.keep += arrays
        buffers = [(a.ctypes.data, a.nbytes) for a in arrays]
        return self.client.call(
            channel, METHOD, buffers, (reply.ctypes.data, reply.nbytes), timeout_s
        )

    def wait(self, *ids: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while any(self.events.get(i) != {FINISHED, RELEASED} for i in ids):
            assert time.monotonic() < deadline, self.events
            for call_id, kind in self.client.poll(0.2) or []:
                self.events.setdefault(call_id, set()).add(kind)


def test_a_request_of_several_buffers_arrives_whole_and_the_reply_lands_in_place(client, echo):
    calls = _Calls(client)
    channel = client.channel(echo)
    reply = np.zeros(64, np.uint8)
    call = calls.start(channel, [b"hello ", b"", b"world"], reply)
    calls.wait(call)
    outcome = client.take(call)
    assert (outcome.code, outcome.details) == (grpc.StatusCode.OK, "")
    assert reply[: outcome.reply_len].tobytes() == b"dlrow olleh"
    with pytest.raises(KeyError):
        client.take(call)  # once


def test_many_large_calls_at_once_each_get_their_own_reply(client, echo):
    calls = _Calls(client)
    channels = [client.channel(echo) for _ in range(2)]
    rng = np.random.default_rng(0)
    requests = [rng.integers(0, 256, size, dtype=np.uint8) for size in (1, 5 << 20, 3 << 20) * 4]
    replies = [np.zeros(r.size, np.uint8) for r in requests]
    ids = [
        calls.start(channels[i % 2], [r[: r.size // 2].tobytes(), r[r.size // 2 :].tobytes()], o)
        for i, (r, o) in enumerate(zip(requests, replies, strict=True))
    ]
    calls.wait(*ids, timeout_s=60)
    for call, request, reply in zip(ids, requests, replies, strict=True):
        outcome = client.take(call)
        assert outcome.code == grpc.StatusCode.OK and outcome.reply_len == request.size
        np.testing.assert_array_equal(reply, request[::-1])


def test_each_failure_ends_the_call_with_its_code(client, echo):
    calls = _Calls(client)
    channel = client.channel(echo)
    small = np.zeros(8, np.uint8)
    cases = {
        "server status": calls.start(channel, [b"fail"], small),
        "deadline": calls.start(channel, [b"slow2"], small, timeout_s=0.3),
        "reply too large": calls.start(channel, [b"0123456789"], small),
        "nobody listens": calls.start(client.channel("127.0.0.1:1"), [b"x"], small),
        "closed channel": calls.start(_closed(client), [b"x"], small),
    }
    cancelled = calls.start(channel, [b"slow2"], small)
    time.sleep(0.2)
    client.cancel(cancelled)
    calls.wait(cancelled, *cases.values())
    got = {what: client.take(call) for what, call in cases.items()}
    assert got["server status"].code == grpc.StatusCode.FAILED_PRECONDITION
    assert got["server status"].details == "asked to fail"
    assert got["deadline"].code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert got["reply too large"].code == grpc.StatusCode.INTERNAL
    assert "10 bytes, larger than the 8 bytes expected" in got["reply too large"].details
    assert got["nobody listens"].code == grpc.StatusCode.UNAVAILABLE
    assert got["closed channel"].code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.take(cancelled).code == grpc.StatusCode.CANCELLED


def _closed(client: NativeClient) -> int:
    channel = client.channel("127.0.0.1:1")
    client.close_channel(channel)
    return channel


def test_shutdown_ends_the_calls_under_way_and_stops_the_poller(echo):
    client = NativeClient()
    calls = _Calls(client)
    call = calls.start(client.channel(echo), [b"slow5"], np.zeros(8, np.uint8))
    polled: list = []
    poller = threading.Thread(target=lambda: polled.append(_drain(client)))
    poller.start()
    time.sleep(0.3)
    started = time.monotonic()
    assert client.shutdown(timeout_s=10)
    poller.join(timeout=10)
    assert time.monotonic() - started < 3  # cancelled, not waited out
    assert (call, FINISHED) in polled[0]
    assert client.take(call).code == grpc.StatusCode.CANCELLED
    client.free()


def _drain(client: NativeClient) -> list:
    events = []
    while (batch := client.poll(0.1)) is not None:
        events += batch
    return events


def test_mutual_tls_a_name_override_and_metadata(client, tmp_path):
    pki = make_pki(tmp_path / "pki", "native CA", LOOPBACK)
    named = make_pki(tmp_path / "named", "named CA", [])
    ca, cert, key = ((pki / n).read_bytes() for n in ("ca.crt", "tls.crt", "tls.key"))
    server, address = _server(grpc.ssl_server_credentials([(key, cert)], ca, True))
    other = NativeClient()
    try:
        calls = _Calls(client)
        reply = np.zeros(256, np.uint8)
        trusted = client.channel(
            address, ca, cert, key, metadata=(("authorization", "Bearer t0k"),)
        )
        ok = calls.start(trusted, [b"meta"], reply)
        renamed_reply = np.zeros(8, np.uint8)
        renamed = calls.start(
            client.channel(address, ca, cert, key, server_name="localhost"), [b"ab"], renamed_reply
        )
        # no client certificate; a CA that does not sign the server; a name the server lacks
        refused = [
            calls.start(client.channel(address, ca), [b"x"], np.zeros(8, np.uint8)),
            calls.start(
                client.channel(address, (named / "ca.crt").read_bytes(), cert, key),
                [b"x"],
                np.zeros(8, np.uint8),
            ),
            calls.start(
                client.channel(address, ca, cert, key, server_name="elsewhere.test"),
                [b"x"],
                np.zeros(8, np.uint8),
            ),
        ]
        calls.wait(ok, renamed, *refused)
        outcome = client.take(ok)
        assert outcome.code == grpc.StatusCode.OK, outcome
        assert b"authorization=Bearer t0k" in reply[: outcome.reply_len].tobytes()
        assert client.take(renamed).code == grpc.StatusCode.OK
        assert renamed_reply[:2].tobytes() == b"ba"
        assert [client.take(c).code for c in refused] == [grpc.StatusCode.UNAVAILABLE] * 3
        with pytest.raises(ValueError, match="TLS server name needs TLS"):
            other.channel(address, server_name="x")
    finally:
        assert other.shutdown()
        other.free()
        server.stop(None)
