"""Messages between a server process and its helper processes over Unix sockets.

A message is a pickled tuple after its 4-byte length. Shared-memory segments (`HostArena`) travel
as file descriptors on a second socket of the pair, each announced by a ("segment", index, size)
message on the first; `map_segment` maps one on the receiving side. Both ends are this project's
own processes, started by the process that holds the other end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import os
import pickle
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

HEADER = struct.Struct("<I")  # length of the pickled message that follows


def pack(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


def unpack(body: bytes) -> tuple:
    return pickle.loads(body)


def read_message(stream) -> tuple | None:
    """The next message from a blocking binary stream (`socket.makefile("rb")`); None at EOF."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (length,) = HEADER.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        return None
    return unpack(body)


async def read_message_async(reader) -> tuple | None:
    """The next message from an asyncio StreamReader; None at EOF."""
    try:
        (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
        return unpack(await reader.readexactly(length))
    except asyncio.IncompleteReadError:
        return None


def send_fd(fd_sock: socket.socket, fd: int) -> None:
    socket.send_fds(fd_sock, [b"s"], [fd])


def map_segment(fd_sock: socket.socket, size: int) -> np.ndarray:
    """Receives the next file descriptor from fd_sock (blocking) and maps `size` bytes of it:
    [size] uint8, shared with the sender."""
    _, fds, _, _ = socket.recv_fds(fd_sock, 1, 1)
    if not fds:
        raise OSError("a segment came without its file descriptor")
    try:
        return np.frombuffer(mmap.mmap(fds[0], size), np.uint8)
    finally:
        os.close(fds[0])


_ROOT = Path(__file__).resolve().parents[1]


def spawn(module: str) -> tuple[subprocess.Popen, socket.socket, socket.socket]:
    """Starts `python -m module --fd N --fds-fd M --log-level L` with this process's Python
    path and log level -> (process, our end of the message socket, our end of the fd socket)."""
    control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds, child_fds = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    command = [sys.executable, "-m", module]
    command += ["--fd", str(child_control.fileno()), "--fds-fd", str(child_fds.fileno())]
    command += ["--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), *sys.path[1:]])}
    try:
        popen = subprocess.Popen(
            command, pass_fds=(child_control.fileno(), child_fds.fileno()), env=env
        )
    finally:
        child_control.close()
        child_fds.close()
    return popen, control, fds


def child_main(
    prog: str,
    run: Callable[[socket.socket, socket.socket], Awaitable[None]],
    argv: list[str] | None = None,
) -> int:
    """The command line of a process `spawn` starts: runs `run(message socket, fd socket)`."""
    parser = argparse.ArgumentParser(prog=f"python -m {prog}")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--fds-fd", type=int, required=True)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format=f"%(asctime)s {prog.rpartition('.')[2]} %(message)s"
    )
    asyncio.run(run(socket.socket(fileno=args.fd), socket.socket(fileno=args.fds_fd)))
    return 0
