"""The native gRPC client (`net.cc`), reached through ctypes.

`NativeClient` makes unary calls of raw message bytes on gRPC C++: a request goes out from the
caller's memory without a copy, a reply is copied once (on a gRPC thread) into memory the caller
chose, and `poll` returns the calls that ended. ctypes drops the GIL for every call into the
library, so the copies and the waiting happen outside the interpreter.

The library is built by `python -m router.native.build` (`./run setup` does it where gRPC C++'s
headers are installed, e.g. Debian's libgrpc++-dev); `MOE_NATIVE_LIB` names another build.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

LIB_NAME = "libmoe_net.so"
FINISHED, RELEASED = 0, 1  # event kinds: the call ended / its request memory is free
_ERR_BYTES = 1024
_POLL_BATCH = 256


class NativeUnavailableError(RuntimeError):
    """The native client library is not built or does not load here."""


def library_path() -> Path:
    override = os.environ.get("MOE_NATIVE_LIB")
    return Path(override) if override else Path(__file__).parent / "build" / LIB_NAME


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The library, loaded once -> raises NativeUnavailableError saying why it cannot be."""
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not path.exists():
        raise NativeUnavailableError(
            f"the native gRPC client is not built ({path} is missing): install gRPC C++ "
            "(Debian: libgrpc++-dev) and run `python -m router.native.build`"
        )
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeUnavailableError(
            f"the native gRPC client at {path} does not load: {err}"
        ) from err
    c = ctypes
    lib.mnet_create.restype = c.c_void_p
    lib.mnet_create.argtypes = []
    lib.mnet_shutdown.restype = c.c_int32
    lib.mnet_shutdown.argtypes = [c.c_void_p, c.c_double]
    lib.mnet_free.restype = None
    lib.mnet_free.argtypes = [c.c_void_p]
    lib.mnet_channel.restype = c.c_int32
    lib.mnet_channel.argtypes = [
        c.c_void_p, c.c_char_p, c.c_char_p, c.c_char_p, c.c_char_p, c.c_char_p,
        c.POINTER(c.c_char_p), c.POINTER(c.c_char_p), c.c_int32, c.c_char_p, c.c_size_t,
    ]  # fmt: skip
    lib.mnet_close_channel.restype = None
    lib.mnet_close_channel.argtypes = [c.c_void_p, c.c_int32]
    lib.mnet_call.restype = c.c_int64
    lib.mnet_call.argtypes = [
        c.c_void_p, c.c_int32, c.c_char_p, c.c_int32, c.POINTER(c.c_void_p),
        c.POINTER(c.c_uint64), c.c_void_p, c.c_uint64, c.c_double,
    ]  # fmt: skip
    lib.mnet_cancel.restype = None
    lib.mnet_cancel.argtypes = [c.c_void_p, c.c_int64]
    lib.mnet_poll.restype = c.c_int32
    lib.mnet_poll.argtypes = [
        c.c_void_p, c.c_double, c.POINTER(c.c_int64), c.POINTER(c.c_int32), c.c_int32,
    ]  # fmt: skip
    lib.mnet_take.restype = c.c_int32
    lib.mnet_take.argtypes = [
        c.c_void_p, c.c_int64, c.POINTER(c.c_int32), c.POINTER(c.c_uint64), c.c_char_p,
        c.c_size_t,
    ]  # fmt: skip
    _lib = lib
    return lib


def available() -> bool:
    try:
        load()
    except NativeUnavailableError:
        return False
    return True


@dataclass(frozen=True)
class Outcome:
    """How a finished call ended: its status, and the reply's length in the reply memory."""

    code: grpc.StatusCode
    details: str
    reply_len: int


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class NativeClient:
    """One client of the library: its channels, calls and event queue. Thread-safe: calls start
    from any thread; one thread polls."""

    def __init__(self) -> None:
        self._lib = load()
        self._handle = ctypes.c_void_p(self._lib.mnet_create())
        self._ids = (ctypes.c_int64 * _POLL_BATCH)()
        self._kinds = (ctypes.c_int32 * _POLL_BATCH)()
        self._idle = False  # shut down with no callback left

    def channel(
        self,
        target: str,
        root_certs: bytes | None = None,
        cert_chain: bytes | None = None,
        private_key: bytes | None = None,
        server_name: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> int:
        """A channel (its own connection) to target -> its id. TLS when root_certs is given."""
        keys = (ctypes.c_char_p * max(1, len(metadata)))(*[k.encode() for k, _ in metadata])
        values = (ctypes.c_char_p * max(1, len(metadata)))(*[v.encode() for _, v in metadata])
        err = ctypes.create_string_buffer(_ERR_BYTES)
        channel = self._lib.mnet_channel(
            self._handle,
            target.encode(),
            root_certs,
            cert_chain,
            private_key,
            None if server_name is None else server_name.encode(),
            keys,
            values,
            len(metadata),
            err,
            _ERR_BYTES,
        )
        if channel < 0:
            raise ValueError(f"no native channel to {target}: {err.value.decode()}")
        return channel

    def close_channel(self, channel: int) -> None:
        self._lib.mnet_close_channel(self._handle, channel)

    def call(
        self,
        channel: int,
        method: bytes,
        parts: list[tuple[int, int]],
        reply: tuple[int, int],
        timeout_s: float,
    ) -> int:
        """Starts a call whose request is parts [(address, nbytes)] in order and whose reply
        goes to reply (address, capacity) -> its id. The caller keeps the parts' memory until
        the call's RELEASED event and the reply's until FINISHED."""
        n = len(parts)
        ptrs = (ctypes.c_void_p * n)(*[p for p, _ in parts])
        lens = (ctypes.c_uint64 * n)(*[size for _, size in parts])
        return self._lib.mnet_call(
            self._handle, channel, method, n, ptrs, lens, reply[0], reply[1], timeout_s
        )

    def cancel(self, call_id: int) -> None:
        self._lib.mnet_cancel(self._handle, call_id)

    def poll(self, timeout_s: float) -> list[tuple[int, int]] | None:
        """Waits up to timeout_s -> [(call id, FINISHED or RELEASED)], None once closed. From
        one thread at a time."""
        n = self._lib.mnet_poll(self._handle, timeout_s, self._ids, self._kinds, _POLL_BATCH)
        if n < 0:
            return None
        return [(self._ids[i], self._kinds[i]) for i in range(n)]

    def take(self, call_id: int) -> Outcome:
        """A FINISHED call's outcome (once; it frees the call)."""
        code, reply_len = ctypes.c_int32(), ctypes.c_uint64()
        details = ctypes.create_string_buffer(_ERR_BYTES)
        found = self._lib.mnet_take(
            self._handle, call_id, ctypes.byref(code), ctypes.byref(reply_len), details, _ERR_BYTES
        )
        if found != 0:
            raise KeyError(f"no finished native call {call_id}")
        status = _CODES.get(code.value, grpc.StatusCode.UNKNOWN)
        return Outcome(status, details.value.decode(errors="replace"), reply_len.value)

    def shutdown(self, timeout_s: float = 5.0) -> bool:
        """Cancels every call and waits for their ends; `poll` then returns None -> False when
        some had not ended after timeout_s (the client then stays allocated: they use it)."""
        self._idle = self._lib.mnet_shutdown(self._handle, timeout_s) == 0
        return self._idle

    def free(self) -> None:
        """After `shutdown`, once no thread polls any more."""
        if self._idle and self._handle is not None:
            self._lib.mnet_free(self._handle)
        self._handle = None
