"""Benchmark the router <-> expert worker transport: one MoE layer's dispatch + combine.

    python bench/transport.py [--workers 1,2,4,8] [--tokens 256,1024,4096] [--hidden 2048,7168]
                              [--precisions fp8,bf16] [--iters 8] [--device cuda]
                              [--max-message-mib 8] [--sweep-mib 2,4,8,16,64] [--model-root DIR]
                              [--forwarders 0,4] [--native 1,2] [--fronts 0,2]
                              [--micro-batches 2,4] [--step-layers 11]

Real expert worker processes (the most --workers of them, each holding 8 of 64 experts of a
one-layer model with tiny experts, I = 128, so that compute is small) and the router's own
dispatch path (`router.dispatch.RemoteExpertBackend` over a `WorkerPool`) in this process: each
iteration dispatches T random tokens [T, H] (top-8 among the experts of the first W workers) and
combines the results, with the device synchronized around it. Reported per configuration
(medians over --iters, after two warm-up layers):

  MB/layer     serialized bytes sent + received per layer (the router's dispatch_bytes metric)
  rtt ms       dispatch -> combined result on the device
  compute ms   the longest total `compute_seconds` of a worker in the layer (the worker's own
               decode, experts and encode; from its /metrics)
  wire ms      rtt - compute: what the transport costs
  GB/s         MB/layer / rtt: aggregate dispatch + combine throughput
  CPU ms       CPU time per layer (user + system, all threads) of the router (this process), its
               forwarders, the workers and their fronts, each role summed over its processes;
               cores = their total / rtt, how many of the host's cores the layer kept busy

--forwarders runs every configuration once per number of forwarder processes (0: the calls go
out on the router's event loop; N: `router.forwarders.ForwarderPool` with N processes), --native
once more per number of connections per worker (`router.native_transport.NativeTransport`, the
gRPC C++ client; needs `python -m router.native.build`); the "sender" column names which. --fronts
starts the workers once per number of front processes each (`expert_worker serve --fronts`).

--micro-batches also times decode-like steps per workers x tokens: --step-layers MoE layers
in a row, each dispatching the step's tokens and combining them (a small matmul on the device
stands in for the dense work between two layers), unsplit and split into n micro-batches in
ping-pong: a micro-batch sends its next layer's calls as soon as its combine is done, while the
other micro-batches' calls are in flight. This is the best case of `MoEModel.forward_overlapped`
for the transport (no attention to overlap): if splitting does not shorten these steps, the
transport's time cannot be hidden behind itself. Medians over --iters steps.

--sweep-mib runs the largest configuration at W = 4 once per message-size cap (the backend's
max_message_bytes; only where the backend has that option). Prints one table per precision and
hidden size, then the command; --json FILE also writes every row.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

# appended, not prepended: PYTHONPATH may name another checkout to measure (e.g. a baseline)
sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from procstat import children_by_parent, cpu_seconds  # noqa: E402

from moe_core.host_threads import apply_cpu_threads  # noqa: E402
from moe_core.spec import ModelSpec  # noqa: E402
from router.dispatch import RemoteExpertBackend  # noqa: E402
from router.forwarders import ForwarderPool  # noqa: E402
from router.metrics import RouterMetrics  # noqa: E402
from router.overlap import split_evenly  # noqa: E402
from router.workers import CHANNEL_OPTIONS, PoolConfig, WorkerPool  # noqa: E402

EXPERTS_PER_WORKER = 8
TOP_K = 8
INTER = 128


def write_model(root: Path, hidden: int, num_experts: int) -> Path:
    """A one-layer DeepSeek-V3-architecture checkpoint with only its routed experts (bf16)."""
    from safetensors.torch import save_file

    out = root / f"transport-h{hidden}-e{num_experts}"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 256,
        "hidden_size": hidden,
        "intermediate_size": 4 * INTER,
        "moe_intermediate_size": INTER,
        "num_hidden_layers": 1,
        "first_k_dense_replace": 0,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "q_lora_rank": None,
        "kv_lora_rank": 64,
        "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
        "n_routed_experts": num_experts,
        "num_experts_per_tok": TOP_K,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for e in range(num_experts):
        p = f"model.layers.0.mlp.experts.{e}"
        for name, shape in (("gate", (INTER, hidden)), ("up", (INTER, hidden))):
            tensors[f"{p}.{name}_proj.weight"] = (
                torch.randn(shape, generator=gen) * 0.02
            ).bfloat16()
        tensors[f"{p}.down_proj.weight"] = (
            torch.randn(hidden, INTER, generator=gen) * 0.02
        ).bfloat16()
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, out / "model.safetensors")
    return out


class Workers:
    """expert_worker processes on loopback, worker i holding experts [8i, 8i + 8)."""

    def __init__(
        self, model: Path, count: int, precision: str, device: str, log_dir: Path, fronts: int = 0
    ):
        self.procs, self.addresses, self.metrics_urls = [], [], []
        files = []
        for i in range(count):
            port_file, metrics_file = log_dir / f"w{i}.port", log_dir / f"w{i}.mport"
            for f in (port_file, metrics_file):
                f.unlink(missing_ok=True)
            experts = f"{i * EXPERTS_PER_WORKER}-{(i + 1) * EXPERTS_PER_WORKER - 1}"
            command = [sys.executable, "-m", "expert_worker", "serve", "--model", str(model)]
            command += ["--experts", experts, "--device", device, "--precision", precision]
            command += ["--port", "0", "--port-file", str(port_file), "--insecure"]
            command += ["--metrics-port", "0", "--metrics-port-file", str(metrics_file)]
            if fronts:
                command += ["--fronts", str(fronts)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            log = (log_dir / f"w{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            )
            files.append((port_file, metrics_file))
        deadline = time.monotonic() + 300
        for proc, (port_file, metrics_file) in zip(self.procs, files, strict=True):
            while not (port_file.is_file() and metrics_file.is_file()):
                if proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"a worker did not start; see the logs in {log_dir}")
                time.sleep(0.1)
            self.addresses.append(f"127.0.0.1:{int(port_file.read_text())}")
            self.metrics_urls.append(f"http://127.0.0.1:{int(metrics_file.read_text())}/metrics")

    def compute_seconds(self) -> list[float]:
        """Each worker's moe_worker_compute_seconds_sum so far."""
        out = []
        for url in self.metrics_urls:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            line = next(
                x for x in text.splitlines() if x.startswith("moe_worker_compute_seconds_sum")
            )
            out.append(float(line.split()[-1]))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


class Router:
    """The router's dispatch path in this process: a WorkerPool on an event-loop thread."""

    def __init__(self, model: Path, addresses: list[str], precision: str, max_message_mib: float):
        self.spec = ModelSpec.from_dir(model)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = RouterMetrics(self.spec.moe_layers, self.spec.num_experts)
        self.addresses = addresses
        self.pool = WorkerPool(self.spec, precision, PoolConfig(), self.metrics)
        self._run(self.pool.start(addresses))
        self.precision = precision
        self.has_message_cap = (
            "max_message_bytes" in inspect.signature(RemoteExpertBackend).parameters
        )
        self.forwarders: list = []  # ForwarderPool and NativeTransport senders, closed at the end
        self.backend = self.make_backend(max_message_mib)

    def make_backend(
        self,
        max_message_mib: float | None,
        forwarders: int = 0,
        device: str = "cpu",
        native_connections: int = 0,
    ) -> RemoteExpertBackend:
        extra = {}
        if self.has_message_cap and max_message_mib:
            extra["max_message_bytes"] = int(max_message_mib * (1 << 20))
        if native_connections:
            from router.native_transport import NativeTransport

            pin = device.startswith("cuda")
            transport = NativeTransport(None, None, pin, self.metrics, native_connections)
            self.forwarders.append(transport)
            extra["transport"] = transport
        elif forwarders:
            pin = device.startswith("cuda")
            pool = ForwarderPool(forwarders, None, None, CHANNEL_OPTIONS, pin, self.metrics)
            self.forwarders.append(pool)
            extra["forwarders"] = pool
            extra["forwarded_min_bytes"] = 0  # every layer through them
        return RemoteExpertBackend(
            self.pool, self.loop, self.precision, 300.0, metrics=self.metrics, **extra
        )

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def wire_bytes(self) -> float:
        total = 0.0
        for address in self.addresses:
            for direction in ("sent", "received"):
                value = self.metrics.registry.get_sample_value(
                    "moe_router_dispatch_bytes_total", {"worker": address, "direction": direction}
                )
                total += value or 0.0
        return total

    def close(self) -> None:
        for pool in self.forwarders:
            pool.close()
        self._run(self.pool.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


ROLES = ("router", "forwarders", "workers", "fronts")


def cpu_by_role(workers: Workers) -> dict[str, float]:
    """CPU seconds so far of each role's processes, summed (see ROLES)."""
    children = children_by_parent()
    worker_pids = [p.pid for p in workers.procs]
    pids = {
        "router": [os.getpid()],
        "forwarders": [c for c in children.get(os.getpid(), []) if c not in worker_pids],
        "workers": worker_pids,
        "fronts": [c for w in worker_pids for c in children.get(w, [])],
    }
    return {role: sum(cpu_seconds(pid) for pid in pids[role]) for role in ROLES}


def run_config(router, backend, workers, active, tokens, hidden, iters, device) -> dict:
    x, ids, weights = _step_inputs(tokens, hidden, active, device, tokens * 31 + active)

    def layer() -> float:
        sync(device)
        start = time.perf_counter()
        backend.combine(backend.dispatch(0, x, ids, weights))
        sync(device)
        return time.perf_counter() - start

    for _ in range(2):
        layer()
    bytes_before, compute_before = router.wire_bytes(), workers.compute_seconds()
    cpu_before = cpu_by_role(workers)
    times = [layer() for _ in range(iters)]
    cpu_after = cpu_by_role(workers)
    compute = [b - a for a, b in zip(compute_before, workers.compute_seconds(), strict=True)]
    cpu_ms = {role: (cpu_after[role] - cpu_before[role]) / iters * 1e3 for role in ROLES}
    rtt = statistics.median(times)
    mb = (router.wire_bytes() - bytes_before) / iters / 1e6
    compute_s = max(compute) / iters
    return {
        "hidden": hidden,
        "workers": active,
        "tokens": tokens,
        "mb_per_layer": mb,
        "rtt_ms": rtt * 1e3,
        "compute_ms": compute_s * 1e3,
        "wire_ms": (rtt - compute_s) * 1e3,
        "gb_per_s": mb / 1e3 / rtt,
        "cpu_ms": cpu_ms,
        "cores": sum(cpu_ms.values()) * iters / 1e3 / sum(times),
    }


def _step_inputs(tokens: int, hidden: int, active: int, device: str, seed: int):
    """x [T, H] bf16, ids [T, k] int64 (top-k among the first `active` workers' experts) and
    weights [T, k] float32, on device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=gen) * 0.5).to(device, torch.bfloat16)
    choices = active * EXPERTS_PER_WORKER
    ids = torch.rand(tokens, choices, generator=gen).topk(TOP_K, dim=1).indices  # [T, k]
    weights = torch.softmax(torch.randn(tokens, TOP_K, generator=gen), dim=1)
    return x, ids.to(device), weights.to(device)


def run_pingpong(backend, active, tokens, hidden, splits, layers, iters, device) -> list[dict]:
    """ms per step of `layers` MoE layers, unsplit and in each of `splits` micro-batches."""
    x, ids, weights = _step_inputs(tokens, hidden, active, device, tokens * 17 + active)
    mix = torch.randn(hidden, hidden, device=device, dtype=torch.bfloat16) * hidden**-0.5

    def dense(h: torch.Tensor) -> torch.Tensor:  # [t, H] -> [t, H]: the work between layers
        return torch.tanh(h @ mix)

    def step(parts: int) -> float:
        lengths = split_evenly([1] * tokens, parts)  # each token a decoding sequence, as the router
        ends = list(itertools.accumulate(lengths))
        micro = list(zip([0, *ends[:-1]], ends, strict=True))  # [(first row, end row)]
        h = [dense(x[a:b]) for a, b in micro]
        sync(device)
        start = time.perf_counter()
        handles = [
            backend.dispatch(0, h[i], ids[a:b], weights[a:b]) for i, (a, b) in enumerate(micro)
        ]
        for layer in range(layers):
            for i, (a, b) in enumerate(micro):  # ping-pong: one combines while others fly
                h[i] = dense(h[i] + backend.combine(handles[i]).to(h[i].dtype))
                if layer + 1 < layers:
                    handles[i] = backend.dispatch(0, h[i], ids[a:b], weights[a:b])
        sync(device)
        return time.perf_counter() - start

    rows = []
    for parts in [1, *splits]:
        if parts > tokens:
            continue
        for _ in range(2):
            step(parts)
        ms = statistics.median(step(parts) for _ in range(iters)) * 1e3
        rows.append({"workers": active, "tokens": tokens, "micro_batches": parts, "ms": ms})
    for row in rows:
        row["vs_unsplit"] = row["ms"] / rows[0]["ms"]
    return rows


def print_pingpong(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| workers | tokens | sender | micro-batches | ms/step | vs unsplit |")
    print("|" + " --- |" * 6)
    for r in rows:
        print(
            f"| {r['workers']} | {r['tokens']} | {r['sender']} | "
            f"{r['micro_batches']} | {r['ms']:.1f} | {r['vs_unsplit']:.2f} |"
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def print_table(title: str, rows: list[dict], key: str = "workers") -> None:
    print(f"\n{title}")
    cpu = " | ".join(f"CPU ms {role}" for role in ROLES)
    print(
        f"| {key} | tokens | sender | MB/layer | rtt ms | compute ms | wire ms | GB/s | {cpu} "
        "| cores |"
    )
    print("|" + " --- |" * (9 + len(ROLES)))
    for r in rows:
        cpu = " | ".join(f"{r['cpu_ms'][role]:.0f}" for role in ROLES)
        print(
            f"| {r[key]} | {r['tokens']} | {r.get('sender', 'loop')} | {r['mb_per_layer']:.1f} | "
            f"{r['rtt_ms']:.2f} | {r['compute_ms']:.2f} | {r['wire_ms']:.2f} | "
            f"{r['gb_per_s']:.2f} | {cpu} | {r['cores']:.1f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument("--workers", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--tokens", type=ints, default=[256, 1024, 4096])
    parser.add_argument("--hidden", type=ints, default=[2048, 7168])
    parser.add_argument("--precisions", default="fp8,bf16")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-message-mib", type=float, default=None, help="backend default")
    parser.add_argument("--sweep-mib", type=lambda s: [float(v) for v in s.split(",")], default=[])
    parser.add_argument(
        "--model-root", type=Path, default=Path(tempfile.gettempdir()) / "moe-bench"
    )
    parser.add_argument("--forwarders", type=ints, default=[0])
    parser.add_argument(
        "--native", type=ints, default=[], help="native transport, connections per worker"
    )
    parser.add_argument("--fronts", type=ints, default=[0], help="front processes per worker")
    parser.add_argument("--micro-batches", type=ints, default=[], help="ping-pong splits")
    parser.add_argument("--step-layers", type=int, default=11, help="MoE layers per step")
    parser.add_argument("--label", default="", help="printed in the table titles")
    parser.add_argument("--json", type=Path, default=None, help="also write every row here")
    args = parser.parse_args()
    apply_cpu_threads(args.device)  # as a router process on this device does

    results, tables, pingpong_tables = [], [], []
    log_dir = Path(tempfile.mkdtemp(prefix="transport-logs-"))
    count = max(args.workers)
    for hidden in args.hidden:
        model = write_model(args.model_root, hidden, count * EXPERTS_PER_WORKER)
        for precision, fronts in itertools.product(args.precisions.split(","), args.fronts):
            workers = Workers(model, count, precision, args.device, log_dir, fronts)
            router = None
            try:
                router = Router(model, workers.addresses, precision, args.max_message_mib)
                backends = {
                    "loop" if n == 0 else f"{n} forwarders": router.make_backend(
                        args.max_message_mib, n, args.device
                    )
                    for n in args.forwarders
                }
                for k in args.native:
                    backends[f"native x{k}"] = router.make_backend(
                        args.max_message_mib, device=args.device, native_connections=k
                    )
                rows = []
                for active in args.workers:
                    for tokens in args.tokens:
                        for n, backend in backends.items():
                            row = run_config(
                                router,
                                backend,
                                workers,
                                active,
                                tokens,
                                hidden,
                                args.iters,
                                args.device,
                            )
                            rows.append(
                                {**row, "precision": precision, "sender": n, "fronts": fronts}
                            )
                            print(json.dumps(rows[-1]), flush=True)
                title = f"{args.label} {precision} tokens, hidden {hidden}, {fronts} fronts/worker"
                tables.append((title.strip(), rows))
                results += rows
                if args.micro_batches:
                    steps = []
                    for active, tokens in itertools.product(args.workers, args.tokens):
                        for n, backend in backends.items():
                            for row in run_pingpong(
                                backend,
                                active,
                                tokens,
                                hidden,
                                args.micro_batches,
                                args.step_layers,
                                args.iters,
                                args.device,
                            ):
                                steps.append({**row, "precision": precision, "sender": n})
                                print(json.dumps(steps[-1]), flush=True)
                    title = f"{args.label} steps of {args.step_layers} MoE layers, {precision}, "
                    title += f"hidden {hidden}, {fronts} fronts/worker"
                    pingpong_tables.append((title.strip(), steps))
                    results += steps
                if args.sweep_mib and router.has_message_cap and hidden == max(args.hidden):
                    sweep = []
                    active = min(4, count)
                    for mib in args.sweep_mib:
                        backend = router.make_backend(mib)
                        row = run_config(
                            router,
                            backend,
                            workers,
                            active,
                            max(args.tokens),
                            hidden,
                            args.iters,
                            args.device,
                        )
                        sweep.append({**row, "precision": precision, "max_message_mib": mib})
                        print(json.dumps(sweep[-1]), flush=True)
                    title = f"{args.label} message-size cap, {precision}, hidden {hidden}, "
                    tables.append((f"{title}{active} workers".strip(), sweep, "max_message_mib"))
                    results += sweep
            finally:
                if router is not None:
                    router.close()
                workers.stop()
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    for title, rows, *key in tables:
        print_table(title, rows, *key)
    for title, rows in pingpong_tables:
        print_pingpong(title, rows)
    print("\ncommand: python bench/transport.py " + shlex.join(sys.argv[1:]))


if __name__ == "__main__":
    main()
