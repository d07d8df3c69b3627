"""Python gRPC's own throughput on loopback, per set of channel arguments.

    python bench/grpc_channel.py [--sets base,frame,window,frame+window,read-chunks,no-bdp]
                                 [--servers 1,4] [--inflight 2] [--seconds 4] [--repeats 2]

No moe-cluster code: S server processes (grpc.aio, one generic unary method that answers every
request of --request-mib with a reply of --reply-mib, the ratio of an FP8 dispatch to its bf16
combine), and one client process with one channel to each, --inflight calls in flight per
channel, for --seconds. GB/s = (request + reply bytes) / wall time. Both sides take the same
arguments: the message limits, plus the set's (SETS). The sets run in turn, --repeats times, so
that drift of the machine shows as spread between repeats rather than between sets.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import queue
import shlex
import sys
import time

import grpc

MIB = 1 << 20
LIMITS = [
    ("grpc.max_send_message_length", 256 * MIB),
    ("grpc.max_receive_message_length", 256 * MIB),
]
SETS = {
    "base": [],
    "frame": [("grpc.http2.max_frame_size", 16 * MIB - 1)],
    "window": [("grpc.http2.lookahead_bytes", 64 * MIB)],
    "frame+window": [
        ("grpc.http2.max_frame_size", 16 * MIB - 1),
        ("grpc.http2.lookahead_bytes", 64 * MIB),
    ],
    "read-chunks": [
        ("grpc.experimental.tcp_read_chunk_size", 4 * MIB),
        ("grpc.experimental.tcp_min_read_chunk_size", MIB),
        ("grpc.experimental.tcp_max_read_chunk_size", 16 * MIB),
    ],
    "no-bdp": [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 64 * MIB)],
}
METHOD = "/bench.Echo/Call"


def _serve(ports: mp.Queue, options: list, request_bytes: int, reply_bytes: int) -> None:
    async def main() -> None:
        reply = b"\x01" * reply_bytes

        async def call(request: bytes, context) -> bytes:
            if len(request) != request_bytes:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unexpected size")
            return reply

        server = grpc.aio.server(options=options)
        handler = grpc.unary_unary_rpc_method_handler(call)  # raw bytes both ways
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Echo", {"Call": handler}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ports.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


async def _client(ports: list[int], options: list, args, request_bytes: int) -> float:
    """GB/s moved by --inflight calls per channel over --seconds."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}", options=options) for p in ports]
    calls = [channel.unary_unary(METHOD) for channel in channels]
    request = b"\x02" * request_bytes
    reply_bytes = 0
    for call in calls:  # connect and warm up
        reply_bytes = len(await call(request))
    done = 0
    start = time.perf_counter()

    async def loop(call) -> None:
        nonlocal done
        while time.perf_counter() - start < args.seconds:
            await call(request)
            done += 1

    await asyncio.gather(*(loop(call) for call in calls for _ in range(args.inflight)))
    seconds = time.perf_counter() - start
    for channel in channels:
        await channel.close()
    return done * (request_bytes + reply_bytes) / seconds / 1e9


def measure(name: str, servers: int, args) -> float:
    options = LIMITS + SETS[name]
    request_bytes, reply_bytes = int(args.request_mib * MIB), int(args.reply_mib * MIB)
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_serve, args=(ports, options, request_bytes, reply_bytes), daemon=True)
        for _ in range(servers)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            bound = [ports.get(timeout=60) for _ in procs]
        except queue.Empty:
            raise RuntimeError(f"a server did not start within 60 s (set {name})") from None
        return asyncio.run(_client(bound, options, args, request_bytes))
    finally:
        for proc in procs:
            proc.terminate()
            proc.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"of {','.join(SETS)}")
    parser.add_argument("--servers", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4])
    parser.add_argument("--inflight", type=int, default=2, help="calls in flight per channel")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--request-mib", type=float, default=8.0)
    parser.add_argument("--reply-mib", type=float, default=16.0)
    args = parser.parse_args()
    names = args.sets.split(",")
    unknown = [n for n in names if n not in SETS]
    if unknown:
        parser.error(f"unknown sets {unknown}; known: {', '.join(SETS)}")
    gbs: dict[tuple[int, str], list[float]] = {}
    for servers in args.servers:
        for _ in range(args.repeats):
            for name in names:
                gbs.setdefault((servers, name), []).append(measure(name, servers, args))
                print(f"servers {servers} {name}: {gbs[servers, name][-1]:.2f} GB/s", flush=True)
    print(f"\nGB/s, one channel per server, {args.inflight} calls in flight each, in repeat order")
    print("| servers | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for servers in args.servers:
        cells = (" ".join(f"{v:.2f}" for v in gbs[servers, n]) for n in names)
        print(f"| {servers} | " + " | ".join(cells) + " |")
    print("\ncommand: python bench/grpc_channel.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
