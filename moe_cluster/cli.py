"""`moe-cluster`: run a local cluster, try it with the demo model, or generate from a running one.

    moe-cluster up --model DIR [--workers N] [--replicas R] [--port P] [--device cpu|cuda]
        [--precision ...] [--on-expert-loss fail|degrade] [--tls-dir DIR] [--auth-token-file FILE]
    moe-cluster demo
    moe-cluster generate --address HOST:PORT [--max-new-tokens N] [--temperature T]
        [--tls | --tls-ca FILE] [--tls-server-name NAME] [--auth-token-file FILE] PROMPT

`up` and `demo` run plaintext on loopback unless `up --tls-dir DIR` gives ca.crt, tls.crt and
tls.key (TLS between every process and for clients).

Exit status: 0 on success, 1 when the cluster or a call fails, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from moe_core.precision import Precision

PROG = "moe-cluster"
DEMO_PROMPT = "Experts of a mixture, spread over a cluster, say:"


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_precision(device: str) -> str:
    """FP8 dispatch and expert weights on GPUs; exact float32 on the CPU."""
    return Precision.FP8.value if device.startswith("cuda") else Precision.FP32.value


# ---------------------------------------------------------------------------------------------
# up


def _up(args: argparse.Namespace) -> int:
    from moe_cluster.launcher import ClusterStartError, LocalCluster
    from moe_core.errors import ModelError
    from moe_core.spec import ModelSpec

    try:
        spec = ModelSpec.from_dir(args.model)
    except ModelError as err:
        return _fail(str(err))
    device = args.device or _default_device()
    precision = args.precision or _default_precision(device)
    router_args = [
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-seq-len",
        str(args.max_seq_len),
        "--on-expert-loss",
        args.on_expert_loss,
        "--forwarders",
        str(args.forwarders),
    ]
    cluster = LocalCluster(
        args.model,
        workers=args.workers,
        replicas=args.replicas,
        precision=precision,
        device=device,
        host=args.host,
        port=args.port,
        router_args=tuple(router_args),
        worker_args=("--fronts", str(args.fronts)),
        log_dir=args.log_dir,
        tls_dir=args.tls_dir,
        auth_token_file=args.auth_token_file,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        print(
            f"starting {args.workers * args.replicas} expert workers ({args.workers} shards x "
            f"{args.replicas} replicas) and a router ({device}, {precision})..."
        )
        cluster.start()
        _print_processes(cluster, spec.model_type, Path(args.model).resolve().name, args)
        while not stop.wait(0.5):
            dead = [p for p in cluster.processes if p.popen.poll() is not None]
            if dead:
                proc = dead[0]
                return _fail(
                    f"{proc.name} exited with status {proc.popen.returncode}; last lines of its "
                    f"log:\n{proc.log_tail()}"
                )
        print("stopping...", flush=True)
        return 0
    except ClusterStartError as err:
        return _fail(str(err))
    finally:
        cluster.stop()


def _print_processes(cluster, model_type: str, model_name: str, args) -> None:
    print(f"\nmoe-cluster serving {model_name} ({model_type}) on {cluster.address}\n")
    print(f"  {'process':<10} {'pid':>8}  {'address':<22} {'metrics':<31} log")
    for proc in cluster.processes:
        print(
            f"  {proc.name:<10} {proc.popen.pid:>8}  {proc.address:<22} "
            f"{proc.metrics_url or '-':<31} {proc.log_path}"
        )
    flags, sdk_args = "", ""
    if args.tls_dir:
        ca = Path(args.tls_dir).resolve() / "ca.crt"
        flags, sdk_args = f" --tls-ca {ca}", f", tls_ca='{ca}'"
    if args.auth_token_file:
        token_file = Path(args.auth_token_file).resolve()
        flags += f" --auth-token-file {token_file}"
        sdk_args += f", token_file='{token_file}'"
    print(
        f"\nTry it:\n"
        f"  moe-cluster generate --address {cluster.address}{flags} 'Hello'\n"
        f'  python -c "from moe_client import Client; '
        f"print(Client('{cluster.address}'{sdk_args}).generate(prompt='Hello').text)\"\n"
        f"\nPress Ctrl-C to stop.",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# generate


def _parse_token_ids(words: list[str]) -> list[int]:
    text = " ".join(words).replace(",", " ")
    try:
        return [int(word) for word in text.split()]
    except ValueError:
        raise ValueError(
            f"--token-ids expects integers such as '1 2 3' or 1,2,3; got {text!r}"
        ) from None


def _generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from moe_client import Client, ClusterError

    try:
        if args.token_ids:
            prompt = {"token_ids": _parse_token_ids(args.prompt)}
        else:
            prompt = {"prompt": " ".join(args.prompt)}
        client = Client(
            args.address,
            timeout=args.timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_server_name=args.tls_server_name,
            token_file=args.auth_token_file,
        )
        with client:
            chunks = client.stream(
                **prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                seed=args.seed,
                ignore_eos=args.ignore_eos,
            )
            start = time.monotonic()
            tokens, last = _stream_to_stdout(chunks)
    except ValueError as err:
        parser.error(str(err))
    except ClusterError as err:
        return _fail(f"{args.address}: {err}")
    seconds = time.monotonic() - start
    print(
        f"[{last.finish_reason}: {tokens} tokens after {last.prompt_tokens} prompt tokens "
        f"in {seconds:.2f} s]",
        file=sys.stderr,
    )
    return 0


def _stream_to_stdout(chunks) -> tuple:
    """Prints each chunk's text (or ids, without a tokenizer) as it arrives -> (tokens, last)."""
    tokens, last = 0, None
    for chunk in chunks:
        tokens += len(chunk.token_ids)
        if chunk.text is not None:
            print(chunk.text, end="", flush=True)
        else:
            print("".join(f" {t}" for t in chunk.token_ids), end="", flush=True)
        last = chunk
    print(flush=True)
    return tokens, last


# ---------------------------------------------------------------------------------------------
# demo


def _demo(args: argparse.Namespace) -> int:
    from moe_client import Client, ClusterError
    from moe_cluster.demo_model import ensure_demo_model
    from moe_cluster.launcher import ClusterStartError, LocalCluster

    print("moe-cluster demo: a random DeepSeek-V3-architecture model (its text is noise)")
    model_dir = ensure_demo_model()
    device = _default_device()
    precision = _default_precision(device)
    print(f"model: {model_dir}\nstarting 2 expert workers and a router ({device}, {precision})...")
    try:
        with (
            LocalCluster(
                model_dir,
                workers=2,
                precision=precision,
                device=device,
                router_args=("--max-batch-size", "16", "--max-seq-len", "512"),
            ) as cluster,
            Client(cluster.address, timeout=300) as client,
        ):
            print(f"cluster serving on {cluster.address}\n")
            print(f"prompt: {DEMO_PROMPT}\noutput: ", end="", flush=True)
            chunks = client.stream(
                prompt=DEMO_PROMPT, max_new_tokens=48, temperature=0.7, top_k=20, seed=0
            )
            tokens, _ = _stream_to_stdout(chunks)
            print(f"({tokens} tokens streamed)\n")
            prefill, decode = _throughput(client, batch=8, prompt_len=64, new_tokens=16)
            print(
                "throughput, 8 concurrent requests of 64 prompt tokens + 16 new tokens:\n"
                f"  prefill {prefill:,.0f} tokens/s, decode {decode:,.0f} tokens/s\n"
            )
            _print_load(client.info())
    except (ClusterStartError, ClusterError) as err:
        return _fail(str(err))
    print("cluster stopped")
    return 0


def _throughput(client, batch: int, prompt_len: int, new_tokens: int) -> tuple[float, float]:
    """Prefill and decode tokens/s of `batch` concurrent generations, timed at the client."""
    start = time.monotonic()

    def one(i: int) -> tuple[float, float]:
        prompt = [(7 * i + 3 * j) % 200 + 32 for j in range(prompt_len)]
        first = None
        for _ in client.stream(token_ids=prompt, max_new_tokens=new_tokens, ignore_eos=True):
            first = first or time.monotonic()
        return first, time.monotonic()

    with ThreadPoolExecutor(batch) as pool:
        times = list(pool.map(one, range(batch)))
    first_tokens = max(t[0] for t in times)  # every prompt prefilled
    end = max(t[1] for t in times)
    prefill = batch * prompt_len / (first_tokens - start)
    decode = batch * (new_tokens - 1) / max(end - first_tokens, 1e-9)
    return prefill, decode


def _print_load(info: dict) -> None:
    """Per-worker expert load: tokens the router sent to each expert."""
    from moe_core.grpc_server import format_ids

    workers = info["workers"]
    total = sum(sum(w["expert_tokens"].values()) for w in workers) or 1
    print(f"expert load ({info['num_experts']} experts, top-{info['top_k']}):")
    print(f"  {'worker':<22} {'experts':<8} {'healthy':<8} {'tokens':>8} {'share':>6}  per expert")
    for w in workers:
        tokens = sum(w["expert_tokens"].values())
        per_expert = " ".join(f"{e}:{n}" for e, n in sorted(w["expert_tokens"].items()))
        print(
            f"  {w['address']:<22} {format_ids(w['experts']):<8} {str(w['healthy']):<8} "
            f"{tokens:>8} {tokens / total:>6.1%}  {per_expert}"
        )


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Serve MoE models as a cluster.")
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="start a router and N expert workers on this machine")
    up.add_argument("--model", required=True, help="Hugging Face model folder")
    up.add_argument("--workers", type=int, default=2, help="shards of the experts")
    up.add_argument("--replicas", type=int, default=1, help="worker processes serving each shard")
    up.add_argument(
        "--on-expert-loss",
        choices=["fail", "degrade"],
        default="fail",
        help="when every replica of a shard is down (see moe-router serve --help)",
    )
    up.add_argument(
        "--forwarders",
        type=int,
        default=0,
        help="processes that send the router's large layers to the workers (see moe-router "
        "serve --help; default 0)",
    )
    up.add_argument(
        "--fronts",
        type=int,
        default=0,
        help="front processes per worker, taking its calls beside it (see moe-expert-worker "
        "serve --help; default 0)",
    )
    up.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    up.add_argument("--port", type=int, default=50051, help="router port (0 = pick a free one)")
    up.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    up.add_argument(
        "--precision",
        choices=[p.value for p in Precision],
        help="default: fp8 on cuda, fp32 on cpu",
    )
    up.add_argument("--max-batch-size", type=int, default=64, help="sequences per step")
    up.add_argument("--max-seq-len", type=int, default=4096, help="tokens per sequence")
    up.add_argument("--log-dir", help="keep the processes' logs here (default: a temp folder)")
    up.add_argument(
        "--tls-dir",
        metavar="DIR",
        help="serve TLS everywhere with DIR/ca.crt, DIR/tls.crt, DIR/tls.key (default: plaintext)",
    )
    up.add_argument(
        "--auth-token-file", metavar="FILE", help="clients must send the bearer token in FILE"
    )

    commands.add_parser("demo", help="build a small random model, serve it, generate, report")

    gen = commands.add_parser("generate", help="stream a generation from a running router")
    gen.add_argument("--address", required=True, help="router HOST:PORT")
    gen.add_argument("--max-new-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = no limit")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = no limit")
    gen.add_argument("--seed", type=int, help="seed of the sampling (default: random)")
    gen.add_argument("--ignore-eos", action="store_true", help="go on after end-of-sequence")
    gen.add_argument("--timeout", type=float, help="seconds for the whole generation")
    gen.add_argument("--tls", action="store_true", help="TLS, verified against the system's CAs")
    gen.add_argument("--tls-ca", metavar="FILE", help="TLS, verified against this PEM CA bundle")
    gen.add_argument("--tls-server-name", help="name to check in the router's certificate")
    gen.add_argument("--auth-token-file", metavar="FILE", help="send the bearer token in FILE")
    gen.add_argument(
        "--token-ids", action="store_true", help="PROMPT is token ids: '1 2 3' or 1,2,3"
    )
    gen.add_argument("prompt", nargs="+", metavar="PROMPT", help="text (or ids with --token-ids)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "up":
        if args.workers < 1:
            parser.error("--workers must be at least 1")
        if args.replicas < 1:
            parser.error("--replicas must be at least 1")
        return _up(args)
    if args.command == "demo":
        return _demo(args)
    return _generate(args, parser)


if __name__ == "__main__":
    sys.exit(main())
