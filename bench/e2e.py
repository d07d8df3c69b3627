"""End-to-end benchmark: our cluster vs our router with in-process experts vs Hugging Face.

    python bench/e2e.py [--sections hf,local,cluster,soak,overlap] [--workers 1,2,4]
                        [--batches 1,16,64,256] [--layers 12] [--prompt-len 128] [--new-tokens 32]
                        [--profile-tokens 8] [--model-root DIR] [--soak-seconds 480] [--json FILE]
                        [--splits 2] [--overlap-repeats 3] [--tiny]

The model: a random DeepSeek-V2-Lite-proportioned checkpoint written once with transformers
(DeepseekV2 architecture: hidden 2048, MLA with kv_lora 512 and no q_lora, 16 heads with
qk_nope 128 / qk_rope 64 / v 128, 64 routed experts top-6 (softmax, greedy) with
moe_intermediate 1408, 2 shared experts, the first layer dense with intermediate 10944, vocab
102400; --layers of them, 12 by default), bf16, in --model-root (reused when it exists). Every
system runs this one checkpoint on the same GPU:

  hf       transformers, bf16, sdpa attention, its default experts implementation, in this
           process: greedy `generate` (prefill = generate 1 token; decode = the extra time of
           generating 1 + new tokens, per step)
  local    our router's model and engine with every routed expert in process
           (`LocalExpertBackend`, FP8 weights quantized at load, no gRPC): the transport's cost
           is the difference to `cluster`
  cluster  `LocalCluster`: a router process on the GPU and W expert worker processes sharing it
           (fp8), driven through the client SDK over loopback gRPC, W from --workers

Per batch B (B prompts of --prompt-len random tokens, ignore_eos): prefill tokens/s (B
prompts, 1 new token each, until every first token arrived), decode tokens/s and ms per output
token (B prompts, 1 + --new-tokens each: tokens received while every sequence is decoding, over
that window). The per-step split comes from profiled decode steps (`router.profiler`; for the
cluster a second router on the same workers with --profile-steps, so the timed runs carry no
synchronizations): ms per decode step in graphs (the dense segments replayed from CUDA graphs,
router.decode_graphs; attention and gating are then in there), attention, gating, dispatch,
experts (remote: waiting for the workers, their longest compute in brackets), combine, sampling,
and the rest. Routers on a GPU decode from CUDA graphs (--local-graphs off, or
--router-args='--cuda-graphs off', for the eager path). Wire bytes
per token are the router's `moe_router_dispatch_bytes_total` (sent + received, all workers):
per prompt token in the prefill run, per generated token in the decode steps.

Memory (cluster): each process's GPU memory (nvidia-smi), host RSS (its own, and the sum of its
helper processes': forwarders, fronts) and each worker's resident expert bytes and
allocated/reserved bytes (its /metrics), after the runs. Section `soak`: the cluster of the
last --workers serves mixed batches (every --batches size above 1, in turn, prompt and 8 new
tokens each) for --soak-seconds while memory is sampled every 10 s; it ends with each process's
RSS by kind (main malloc heap, other anonymous memory, mapped files; and its threads) at the
soak's start, middle and end. Section `overlap`: the first
--workers, with routers unsplit, split into each of --splits micro-batches, `auto` (and a
profiled one for the transport time); each timed --overlap-repeats times, interleaved, median;
with the splits auto chose.

Prints the table last, then the command. --tiny runs a small model (for a quick check, also on
a CPU with --device cpu).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

from procstat import children_by_parent, rss_by_kind, rss_mib  # noqa: E402

from moe_core.host_threads import apply_cpu_threads  # noqa: E402

PHASE_COLUMNS = ("graphs", "attention", "gating", "dispatch", "experts", "combine", "sampling")
MODEL_VERSION = "1"  # bump when the written checkpoint changes


def model_config(layers: int, tiny: bool) -> dict:
    """DeepseekV2Config arguments: DeepSeek-V2-Lite's proportions, `layers` decoder layers."""
    if tiny:
        sizes = dict(
            vocab_size=1024,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=16,
            num_experts_per_tok=4,
            kv_lora_rank=64,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
        )
    else:
        sizes = dict(
            vocab_size=102400,
            hidden_size=2048,
            intermediate_size=10944,
            moe_intermediate_size=1408,
            num_attention_heads=16,
            num_key_value_heads=16,
            n_routed_experts=64,
            num_experts_per_tok=6,
            kv_lora_rank=512,
            qk_nope_head_dim=128,
            qk_rope_head_dim=64,
            v_head_dim=128,
        )
    return dict(
        **sizes,
        num_hidden_layers=layers,
        n_shared_experts=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        tie_word_embeddings=False,
    )


def ensure_model(root: Path, layers: int, tiny: bool, device: str) -> Path:
    """The checkpoint folder, written with transformers (bf16, random) unless already there."""
    config = model_config(layers, tiny)
    name = f"deepseek-v2-lite-{'tiny-' if tiny else ''}{layers}l"
    out = root / name
    stamp = out / ".bench-model"
    if stamp.is_file() and stamp.read_text() == MODEL_VERSION:
        return out
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    start = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = DeepseekV2ForCausalLM(DeepseekV2Config(**config)).eval()
    finally:
        torch.set_default_dtype(default)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_original_format=True)  # per-expert tensors, as on the hub
    params = sum(p.numel() for p in model.parameters())
    del model
    release(device)
    stamp.write_text(MODEL_VERSION)
    print(f"wrote {out} ({params / 1e9:.2f} B parameters) in {time.perf_counter() - start:.0f} s")
    return out


def release(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Row:
    system: str
    batch: int
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    ms_per_token: float = 0.0  # one decode step: the time between two tokens of a sequence
    phases_ms: dict[str, float] = field(default_factory=dict)  # per profiled decode step
    wire_kb_prefill: float | None = None  # per prompt token
    wire_kb_decode: float | None = None  # per generated token


def prompts_for(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed + batch)
    return torch.randint(2, vocab, (batch, length), generator=gen).tolist()


# ---------------------------------------------------------------------------------------------
# Hugging Face


def run_hf(model_dir: Path, args, vocab: int) -> list[Row]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model = model.to(args.device).eval()
    experts = getattr(model.config, "_experts_implementation", None)
    print(f"hf: transformers, bf16, sdpa, experts implementation {experts}")

    def generate(ids: torch.Tensor, new: int) -> float:
        sync(args.device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        sync(args.device)
        return time.perf_counter() - start

    rows = []
    warm = torch.tensor(prompts_for(2, 16, vocab), device=args.device)
    generate(warm, 4)
    for batch in args.batches:
        ids = torch.tensor(prompts_for(batch, args.prompt_len, vocab), device=args.device)
        first = min(generate(ids, 1) for _ in range(2))
        total = generate(ids, 1 + args.new_tokens)
        step = (total - first) / args.new_tokens
        rows.append(
            Row(
                "hf bf16",
                batch,
                prefill_tok_s=batch * args.prompt_len / first,
                decode_tok_s=batch / step,
                ms_per_token=step * 1e3,
            )
        )
        print(rows[-1], flush=True)
    model = None  # frees the weights (the closure above holds the name)
    release(args.device)
    return rows


# ---------------------------------------------------------------------------------------------
# our engine, driven through a `stream(prompt_ids, max_new_tokens)` async iterator of token lists


async def run_all(stream, prompts: list[list[int]], new_tokens: int) -> int:
    """Generates new_tokens for every prompt, concurrently -> tokens received."""

    async def one(prompt) -> int:
        return sum([len(token_ids) async for token_ids in stream(prompt, new_tokens)])

    return sum(await asyncio.gather(*(one(p) for p in prompts)))


async def prefill_rate(stream, prompts: list[list[int]]) -> float:
    """B prompts with one new token each, concurrently -> prompt tokens per second."""

    async def one(prompt):
        async for _ in stream(prompt, 1):
            pass

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return sum(len(p) for p in prompts) / (time.perf_counter() - start)


async def decode_rate(stream, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """B prompts with 1 + new_tokens each, concurrently -> (tokens/s, seconds per step) over the
    window in which every sequence is decoding (after the last first token, before the first
    sequence ends)."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in prompts]

    async def one(i, prompt):
        async for token_ids in stream(prompt, 1 + new_tokens):
            arrivals[i].append((time.perf_counter(), len(token_ids)))

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    begin = max(a[0][0] for a in arrivals)  # every sequence has its first token
    end = min(a[-1][0] for a in arrivals)  # before any sequence finished
    tokens = sum(n for a in arrivals for t, n in a if begin < t <= end)
    if tokens == 0 or end <= begin:
        raise RuntimeError("no decode window: raise --new-tokens")
    rate = tokens / (end - begin)
    return rate, len(prompts) / rate


class ProfileSink:
    """Sums profiled decode steps (router.profiler sink)."""

    def __init__(self) -> None:
        self.steps, self.seconds, self.phases = 0, 0.0, {}

    def __call__(self, kind: str, phases: dict[str, float], seconds: float) -> None:
        if kind != "decode":
            return
        self.steps += 1
        self.seconds += seconds
        for name, value in phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + value


def split_ms(phases: dict[str, float], steps: int, step_seconds: float) -> dict[str, float]:
    """Phase seconds summed over steps -> ms per step for the table's columns (+ rest)."""
    per = {name: 1e3 * value / max(steps, 1) for name, value in phases.items()}
    out = {name: per.get(name, 0.0) for name in PHASE_COLUMNS}
    out["worker_compute"] = per.get("worker_compute", 0.0)
    out["step"] = 1e3 * step_seconds / max(steps, 1)
    out["rest"] = out["step"] - sum(out[name] for name in PHASE_COLUMNS)
    return out


def run_local(model_dir: Path, args, vocab: int) -> list[Row]:
    from expert_worker.experts import ExpertShard
    from moe_core.spec import ModelSpec
    from router.decode_graphs import cache_and_graphs
    from router.engine import Engine, GenerationRequest
    from router.expert_backend import LocalExpertBackend
    from router.model import load_model
    from router.profiler import StepProfiler
    from router.scheduler import Scheduler

    spec = ModelSpec.from_dir(model_dir)
    start = time.perf_counter()
    shard = ExpertShard.load(
        model_dir, range(spec.num_experts), "fp8", device=args.device, progress=False
    )
    model = load_model(model_dir, LocalExpertBackend(shard), args.device, torch.bfloat16)
    print(f"local: loaded in {time.perf_counter() - start:.0f} s", flush=True)
    max_len = args.prompt_len + args.new_tokens + 8
    max_batch = max(args.batches)
    graphs_on = args.local_graphs == "on"
    cache, graphs = cache_and_graphs(
        model, max_batch, max_len, args.device, torch.bfloat16, graphs_on
    )
    scheduler = Scheduler(
        cache,
        max_batch_size=max_batch,
        max_step_tokens=max(8192, max_len),
        max_seq_len=max_len,
        eos_token_ids=spec.eos_token_ids,
    )

    async def main() -> list[Row]:
        engine = Engine(model, cache, scheduler, graphs=graphs)
        await engine.start()

        async def stream(prompt, new):
            request = GenerationRequest(prompt, new, ignore_eos=True)
            async for chunk in engine.generate(request):
                yield chunk.token_ids

        rows = []
        try:
            await run_all(stream, prompts_for(4, 16, vocab), 4)  # warm-up (kernel builds)
            for batch in args.batches:
                prompts = prompts_for(batch, args.prompt_len, vocab)
                await run_all(stream, prompts, 2)  # warm-up at this size
                row = Row("ours in-process fp8", batch)
                row.prefill_tok_s = await prefill_rate(stream, prompts)
                row.decode_tok_s, step = await decode_rate(stream, prompts, args.new_tokens)
                row.ms_per_token = step * 1e3
                sink = ProfileSink()
                model.set_profiler(StepProfiler(args.device, sink))
                try:
                    await run_all(stream, prompts, args.profile_tokens)
                finally:
                    model.set_profiler(None)
                row.phases_ms = split_ms(sink.phases, sink.steps, sink.seconds)
                rows.append(row)
                print(row, flush=True)
        finally:
            await engine.stop()
        return rows

    rows = asyncio.run(main())
    model = shard = cache = None  # frees the weights and the KV cache
    release(args.device)
    return rows


# ---------------------------------------------------------------------------------------------
# the cluster


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text -> {(name, sorted label pairs): value}."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        pairs = tuple(
            sorted(
                tuple(p.split("=", 1)) for p in labels.rstrip("}").replace('"', "").split(",") if p
            )
        )
        out[(name, pairs)] = float(value)
    return out


def metric_sum(samples: dict, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and want <= set(pairs))


def gpu_memory_by_pid() -> dict[int, float]:
    """nvidia-smi's per-process GPU memory, MiB."""
    try:
        text = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            with contextlib.suppress(ValueError):
                out[int(parts[0])] = float(parts[1])
    return out


def memory_report(cluster, extra) -> dict:
    """Per process: nvidia-smi MiB and host RSS MiB (its own, and its helper processes' sum);
    per worker also resident expert bytes, allocated, reserved."""
    smi, children = gpu_memory_by_pid(), children_by_parent()
    report = {}
    for proc in [cluster.router, extra, *cluster.workers]:
        pid = proc.popen.pid
        helpers = [rss_mib(child) for child in children.get(pid, [])]
        entry = {
            "gpu_mib": smi.get(pid),
            "rss_mib": rss_mib(pid),
            "helpers_rss_mib": sum(r for r in helpers if r is not None),
            "rss_kinds": rss_by_kind(pid),
        }
        if proc.name.startswith("worker"):
            m = scrape(proc.metrics_url)
            for key in ("resident_weight_bytes", "gpu_memory_allocated_bytes"):
                entry[key] = metric_sum(m, f"moe_worker_{key}")
            entry["gpu_memory_reserved_bytes"] = metric_sum(
                m, "moe_worker_gpu_memory_reserved_bytes"
            )
        report[proc.name] = entry
    return report


def run_cluster(
    model_dir: Path, args, vocab: int, workers: int, runs: bool, soak: bool
) -> tuple[list, dict]:
    from moe_cluster import LocalCluster

    max_len = args.prompt_len + args.new_tokens + 8
    router_args = ("--max-batch-size", str(max(args.batches)), "--max-seq-len", str(max_len))
    router_args += tuple(args.router_args.split())
    log_dir = Path(tempfile.mkdtemp(prefix=f"e2e-w{workers}-"))
    start = time.perf_counter()
    cluster = LocalCluster(
        model_dir,
        workers=workers,
        precision="fp8",
        device=args.device,
        worker_devices=tuple(args.worker_devices.split(",")) if args.worker_devices else (),
        router_args=router_args,
        worker_args=tuple(args.worker_args.split()),
        log_dir=log_dir,
        start_timeout_s=600,
    )
    with cluster:
        # a second router on the same workers, profiling its steps (timed runs stay unprofiled)
        profiled = cluster.add_router("router-profiled", ("--profile-steps",))
        print(f"cluster W={workers}: up in {time.perf_counter() - start:.0f} s", flush=True)
        return asyncio.run(_cluster_runs(cluster, profiled, args, vocab, workers, runs, soak))


async def _cluster_runs(cluster, profiled, args, vocab, workers, runs, soak) -> tuple[list, dict]:
    from moe_client import AsyncClient

    clients = {
        "timed": AsyncClient(cluster.address, timeout=600),
        "profiled": AsyncClient(profiled.address, timeout=600),
    }

    def streamer(client):
        async def stream(prompt, new):
            async for chunk in client.stream(token_ids=prompt, max_new_tokens=new, ignore_eos=True):
                yield chunk.token_ids

        return stream

    timed, prof = streamer(clients["timed"]), streamer(clients["profiled"])

    def wire_bytes() -> float:
        return metric_sum(scrape(cluster.router.metrics_url), "moe_router_dispatch_bytes_total")

    rows = []
    memory = {"at_start": memory_report(cluster, profiled)}  # before any request
    try:
        for stream in (timed, prof):  # warm-up: kernel builds, channels
            await run_all(stream, prompts_for(4, 16, vocab), 4)
        for batch in args.batches if runs else []:
            prompts = prompts_for(batch, args.prompt_len, vocab)
            await run_all(timed, prompts, 2)  # warm-up at this size
            row = Row(f"ours cluster fp8, {workers} worker{'s' if workers > 1 else ''}", batch)
            before = wire_bytes()
            row.prefill_tok_s = await prefill_rate(timed, prompts)
            prefill_bytes = wire_bytes() - before
            before = wire_bytes()
            row.decode_tok_s, step = await decode_rate(timed, prompts, args.new_tokens)
            decode_bytes = wire_bytes() - before - prefill_bytes
            row.ms_per_token = step * 1e3
            row.wire_kb_prefill = prefill_bytes / (batch * args.prompt_len) / 1e3
            row.wire_kb_decode = decode_bytes / (batch * args.new_tokens) / 1e3
            m0 = scrape(profiled.metrics_url)
            await run_all(prof, prompts, args.profile_tokens)
            m1 = scrape(profiled.metrics_url)
            phases = {}
            for (name, pairs), value in m1.items():
                if name == "moe_router_step_phase_seconds_total" and ("step", "decode") in pairs:
                    phase = dict(pairs)["phase"]
                    phases[phase] = value - m0.get((name, pairs), 0.0)
            steps = metric_sum(m1, "moe_router_profiled_steps_total", step="decode") - metric_sum(
                m0, "moe_router_profiled_steps_total", step="decode"
            )
            seconds = metric_sum(
                m1, "moe_router_profiled_step_seconds_total", step="decode"
            ) - metric_sum(m0, "moe_router_profiled_step_seconds_total", step="decode")
            row.phases_ms = split_ms(phases, int(steps), seconds)
            rows.append(row)
            print(row, flush=True)
        memory["after_runs"] = memory_report(cluster, profiled)
        if soak:
            memory["soak"] = await _soak(cluster, profiled, timed, args, vocab)
    finally:
        for client in clients.values():
            await client.close()
    return rows, memory


def run_overlap(model_dir: Path, args, vocab: int, workers: int) -> None:
    """Decode with the step unsplit, in each of --splits micro-batches and as --micro-batches
    auto picks, on one set of workers; the transport of a step (dispatch + experts + combine)
    from profiled unsplit steps; hidden = the step time overlap saves / that transport time.
    Prints a table."""
    from moe_cluster import LocalCluster

    max_len = args.prompt_len + args.new_tokens + 8
    common = ("--max-batch-size", str(max(args.batches)), "--max-seq-len", str(max_len))
    common += tuple(args.router_args.split())
    cluster = LocalCluster(
        model_dir,
        workers=workers,
        precision="fp8",
        device=args.device,
        router_args=(*common, "--micro-batches", "1"),
        worker_args=tuple(args.worker_args.split()),
        log_dir=Path(tempfile.mkdtemp(prefix=f"e2e-overlap-w{workers}-")),
        start_timeout_s=600,
    )
    splits = [str(n) for n in args.splits]
    with cluster:
        # (the cluster's options come first: a later --micro-batches wins)
        routers = {"1": cluster.router}
        for n in splits:
            routers[n] = cluster.add_router(f"router-mb{n}", ("--micro-batches", n))
        routers["auto"] = cluster.add_router("router-auto", ("--micro-batches", "auto"))
        routers["profiled"] = cluster.add_router("router-profiled", ("--profile-steps",))
        rows = asyncio.run(_overlap_runs(routers, args, vocab))
    timed = [*splits, "auto"]
    print(f"\noverlap, {workers} workers: ms per decode step (auto: its decode steps by split)")
    head = ["batch", "unsplit", *(f"{n} micro-batches" for n in splits), "auto"]
    head += ["transport (unsplit)", *(f"hidden, {k}" for k in timed)]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for batch, ms, transport, chosen in rows:
        hidden = [(ms["1"] - ms[k]) / transport if transport else 0.0 for k in timed]
        picks = ", ".join(f"{n}: {steps:.0f}" for n, steps in sorted(chosen.items()))
        cells = [str(batch), *(f"{ms[k]:.1f}" for k in ["1", *splits])]
        cells += [f"{ms['auto']:.1f} ({picks})", f"{transport:.1f}"]
        print("| " + " | ".join(cells + [f"{h:.0%}" for h in hidden]) + " |")


def micro_batch_steps(samples: dict) -> dict[int, float]:
    """A router's steps so far by the number of micro-batches they ran in (its /metrics)."""
    out = {}
    for (name, pairs), value in samples.items():
        if name == "moe_router_step_micro_batches_total":
            out[int(dict(pairs)["micro_batches"])] = value
    return out


async def _overlap_runs(routers, args, vocab) -> list[tuple[int, dict, float, dict]]:
    from moe_client import AsyncClient

    clients = {name: AsyncClient(r.address, timeout=600) for name, r in routers.items()}

    def streamer(client):
        async def stream(prompt, new):
            async for chunk in client.stream(token_ids=prompt, max_new_tokens=new, ignore_eos=True):
                yield chunk.token_ids

        return stream

    streams = {name: streamer(c) for name, c in clients.items()}
    rows = []
    timed = [n for n in routers if n != "profiled"]
    try:
        for stream in streams.values():
            await run_all(stream, prompts_for(4, 16, vocab), 4)
        for batch in args.batches:
            prompts = prompts_for(batch, args.prompt_len, vocab)
            for name in timed:
                await run_all(streams[name], prompts, 8)  # warm-up; auto measures its sizes
            before = micro_batch_steps(scrape(routers["auto"].metrics_url))
            steps_ms: dict[str, list[float]] = {name: [] for name in timed}
            for _ in range(args.overlap_repeats):  # interleaved, so that drift hits all alike
                for name in timed:
                    _, step = await decode_rate(streams[name], prompts, args.new_tokens)
                    steps_ms[name].append(step * 1e3)
            ms = {name: statistics.median(v) for name, v in steps_ms.items()}
            after = micro_batch_steps(scrape(routers["auto"].metrics_url))
            chosen = {n: v - before.get(n, 0.0) for n, v in after.items() if v > before.get(n, 0)}
            url = routers["profiled"].metrics_url
            m0 = scrape(url)
            await run_all(streams["profiled"], prompts, args.profile_tokens)
            m1 = scrape(url)
            transport, steps = 0.0, 0.0
            for (name, pairs), value in m1.items():
                labels = dict(pairs)
                if (
                    name == "moe_router_step_phase_seconds_total"
                    and labels.get("step") == "decode"
                    and labels.get("phase") in ("dispatch", "experts", "combine")
                ):
                    transport += value - m0.get((name, pairs), 0.0)
            steps = metric_sum(m1, "moe_router_profiled_steps_total", step="decode") - metric_sum(
                m0, "moe_router_profiled_steps_total", step="decode"
            )
            rows.append((batch, ms, transport / max(steps, 1) * 1e3, chosen))
            print(batch, ms, rows[-1][2], chosen, flush=True)
    finally:
        for client in clients.values():
            await client.close()
    return rows


async def _soak(cluster, profiled, stream, args, vocab) -> list[dict]:
    """Serves mixed batches for --soak-seconds; samples memory every 10 s."""
    samples = [{"t": 0.0, "tokens": 0, **memory_report(cluster, profiled)}]
    start = time.perf_counter()
    tokens = 0
    sizes = [b for b in args.batches if b > 1] or args.batches
    turn = 0
    next_sample = 10.0
    while time.perf_counter() - start < args.soak_seconds:
        batch = sizes[turn % len(sizes)]
        turn += 1
        prompts = prompts_for(batch, args.prompt_len, vocab, seed=turn)
        tokens += await run_all(stream, prompts, 8) + batch * args.prompt_len
        elapsed = time.perf_counter() - start
        if elapsed >= next_sample:
            samples.append({"t": elapsed, "tokens": tokens, **memory_report(cluster, profiled)})
            next_sample += 10.0
    elapsed = time.perf_counter() - start
    samples.append({"t": elapsed, "tokens": tokens, **memory_report(cluster, profiled)})
    return samples


# ---------------------------------------------------------------------------------------------
# report


def print_table(rows: list[Row]) -> None:
    print(
        "\n| system | batch | prefill tok/s | decode tok/s | ms/token | graphs | attention | "
        "gating | dispatch | experts (worker) | combine | sampling | rest | KB/token prefill, "
        "decode |"
    )
    print("| --- " * 14 + "|")
    for r in rows:
        p = r.phases_ms

        def ms(name: str, p=p) -> str:
            return f"{p[name]:.2f}" if name in p else "-"

        experts = f"{p['experts']:.2f}" if p else "-"
        if p.get("worker_compute"):
            experts += f" ({p['worker_compute']:.2f})"
        wire = "-"
        if r.wire_kb_prefill is not None:
            wire = f"{r.wire_kb_prefill:.1f}, {r.wire_kb_decode:.1f}"
        print(
            f"| {r.system} | {r.batch} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.0f} | "
            f"{r.ms_per_token:.1f} | {ms('graphs')} | {ms('attention')} | {ms('gating')} | "
            f"{ms('dispatch')} | "
            f"{experts} | {ms('combine')} | {ms('sampling')} | {ms('rest')} | {wire} |"
        )


def print_memory(memory: dict) -> None:
    for workers, report in memory.items():
        print(f"\nmemory, cluster of {workers} workers (at start / after the runs):")
        print(
            "| process | nvidia-smi MiB | RSS MiB | helpers' RSS MiB | expert bytes MiB "
            "| allocated MiB | reserved MiB |"
        )
        print("| --- " * 7 + "|")
        rows = [(f"{n} (start)", e) for n, e in report["at_start"].items()]
        rows += list(report["after_runs"].items())
        for name, e in rows:
            cells = [e.get("gpu_mib"), e.get("rss_mib"), e.get("helpers_rss_mib")] + [
                (e[k] / 2**20 if k in e else None)
                for k in (
                    "resident_weight_bytes",
                    "gpu_memory_allocated_bytes",
                    "gpu_memory_reserved_bytes",
                )
            ]
            print(
                f"| {name} | " + " | ".join("-" if c is None else f"{c:,.0f}" for c in cells) + " |"
            )
        soak = report.get("soak")
        if soak:
            print(
                f"\nsoak, {workers} workers: memory per process over time: nvidia-smi MiB "
                "(workers: allocator reserved MiB) / host RSS MiB (+ its helper processes' RSS); "
                "tokens = prompt + generated tokens so far"
            )
            names = [n for n in soak[0] if n not in ("t", "tokens")]
            print("| s | tokens | " + " | ".join(names) + " |")
            print("| --- " * (len(names) + 2) + "|")
            for s in soak:
                cells = " | ".join(_soak_cell(s[n]) for n in names)
                print(f"| {s['t']:.0f} | {s['tokens']:,} | {cells} |")
            _print_rss_kinds(soak, names)


def _print_rss_kinds(soak: list[dict], names: list[str]) -> None:
    """Each process's RSS by kind (procstat.rss_by_kind) at the soak's start, middle and end."""
    picks = [soak[0], soak[len(soak) // 2], soak[-1]]
    print(
        "\nhost RSS MiB by kind, heap / anon / file (threads), at "
        + ", ".join(f"{s['t']:.0f} s" for s in picks)
    )
    print("| process | " + " | ".join(f"{s['t']:.0f} s" for s in picks) + " |")
    print("| --- " * (len(picks) + 1) + "|")
    for name in names:
        cells = []
        for s in picks:
            k = s[name].get("rss_kinds")
            cells.append(
                "-"
                if k is None
                else f"{k['heap']:,.0f} / {k['anon']:,.0f} / {k['file']:,.0f} ({k['threads']})"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")


def _soak_cell(entry: dict) -> str:
    text = "-" if entry.get("gpu_mib") is None else f"{entry['gpu_mib']:,.0f}"
    if "gpu_memory_reserved_bytes" in entry:
        text += f" ({entry['gpu_memory_reserved_bytes'] / 2**20:,.0f})"
    if entry.get("rss_mib") is not None:
        text += f" / {entry['rss_mib']:,.0f}"
        if entry.get("helpers_rss_mib"):
            text += f" (+{entry['helpers_rss_mib']:,.0f})"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    parser.add_argument(
        "--sections", default="hf,local,cluster", help="of hf,local,cluster,soak,overlap"
    )
    parser.add_argument("--workers", type=ints, default=[1, 2, 4])
    parser.add_argument("--batches", type=ints, default=[1, 16, 64, 256])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile-tokens", type=int, default=8)
    parser.add_argument("--soak-seconds", type=float, default=480.0)
    parser.add_argument(
        "--overlap-repeats",
        type=int,
        default=3,
        help="overlap: timed decode runs per router, interleaved; the median is reported",
    )
    parser.add_argument(
        "--splits",
        type=ints,
        default=[2],
        help="overlap: the fixed micro-batch counts compared with unsplit and auto",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--model-root", type=Path, default=Path(tempfile.gettempdir()) / "moe-bench"
    )
    parser.add_argument(
        "--worker-devices",
        default="",
        help="devices the workers take in turn, e.g. cuda:1,cuda:2,cuda:3 (default: --device)",
    )
    parser.add_argument(
        "--router-args",
        default="",
        help="more options of every cluster router, e.g. '--forwarders 4' (one string)",
    )
    parser.add_argument(
        "--worker-args",
        default="",
        help="more options of every cluster worker, e.g. '--fronts 2' (one string)",
    )
    parser.add_argument(
        "--local-graphs",
        choices=["on", "off"],
        default="on",
        help="local: decode steps from CUDA graphs, as a router does by default (cluster "
        "routers: --router-args='--cuda-graphs off')",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write rows and memory here")
    parser.add_argument("--tiny", action="store_true", help="a small model, for a quick check")
    args = parser.parse_args()
    sections = args.sections.split(",")
    apply_cpu_threads(args.device)  # "local" is a router in this process: as a router sets it

    model_dir = ensure_model(args.model_root, args.layers, args.tiny, args.device)
    vocab = model_config(args.layers, args.tiny)["vocab_size"]
    rows: list[Row] = []
    memory: dict = {}
    if "hf" in sections:
        rows += run_hf(model_dir, args, vocab)
    if "local" in sections:
        rows += run_local(model_dir, args, vocab)
    if "cluster" in sections or "soak" in sections:
        for i, workers in enumerate(args.workers):
            soak = "soak" in sections and i == len(args.workers) - 1
            if "cluster" not in sections and not soak:
                continue
            cluster_rows, memory[workers] = run_cluster(
                model_dir, args, vocab, workers, runs="cluster" in sections, soak=soak
            )
            rows += cluster_rows
    if "overlap" in sections:
        run_overlap(model_dir, args, vocab, args.workers[0])
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [r.__dict__ for r in rows], "memory": memory}))
    print_memory(memory)
    print_table(rows)
    print("\ncommand: python bench/e2e.py " + shlex.join(sys.argv[1:]))
    if rows and "hf" in sections:
        hf = {r.batch: r.decode_tok_s for r in rows if r.system.startswith("hf")}
        for r in rows:
            if not r.system.startswith("hf") and r.batch in hf:
                print(f"{r.system}, batch {r.batch}: decode {r.decode_tok_s / hf[r.batch]:.2f}x hf")


if __name__ == "__main__":
    main()
