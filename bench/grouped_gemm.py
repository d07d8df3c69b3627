"""Benchmark the FP8 block-scaled grouped GEMM and the expert MLP against torch's grouped GEMMs.

    python bench/grouped_gemm.py [--sections gemm,decode,worker,configs] [--configs a,b]
                                 [--max-ctas N] [--prefill v2|v3] [--shapes gate_up,down]
                                 [--sizes 8x512,32x256] [--passes N]

Tables (printed with the command that made them):
  gemm     TFLOP/s at DeepSeek-V3 expert shapes (gate_up N=4096 K=7168, down N=7168 K=2048),
           G x m in {8x512, 32x256, 64x128}: ours, v2 (cp.async wgmma) and v3 (TMA, warp-
           specialised, persistent; also with clusters of two CTAs sharing A (x2) or B (b2)),
           FP8 with 1x128 / 128x128 block scales, vs
           torch._scaled_grouped_mm (FP8, rowwise scales), torch._grouped_mm (bf16) and a
           per-expert bf16 loop.
  decode   m in {1, 4, 16} rows per group, 32 and 256 groups: GB/s of weights streamed.
  worker   tokens/s of one worker holding 32 DeepSeek-V3 experts (H=7168, I=2048), top-8 of 256.
  configs  our kernel with each tile configuration of --configs (default: all but the SwiGLU
           ones) at the gemm shapes and two decode shapes (--sizes picks some), each cell with
           its ratio to torch._scaled_grouped_mm timed in the same pass (--passes repeats the
           table); --max-ctas caps the persistent grid. A name `base+KEY=VAL+...` is the
           configuration `base` with compile-time overrides, e.g. `tma128n256+PROBE=2` for the
           kernel's timing probes (grouped_gemm_tma.cu).
  clocks   for each configuration of --configs and torch._scaled_grouped_mm: TFLOP/s, median
           SM clock and board power (NVML, sampled every 10 ms) over about a second of
           back-to-back launches, at the --sizes (default 8x512) of the --shapes.
--shapes picks the shapes of the gemm, configs and clocks sections.
--prefill picks the prefill kernel of pick_config (decode and worker sections), --scatter the one
of the down GEMM's weighted scatter-add.
Times are CUDA-event medians of 5 trials of back-to-back launches after a warm-up.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from expert_worker.kernels import (  # noqa: E402
    expert_mlp_fp8,
    expert_mlp_fp8_unfused,
    expert_mlp_torch,
    grouped_gemm,
    grouped_gemm_fp8,
    swiglu_quant_fp8,
)
from expert_worker.kernels.grouped_gemm import (  # noqa: E402
    CONFIGS,
    EPI_BF16,
    EPI_WEIGHTED_ADD,
    launch,
    pick_config,
)
from moe_core.fp8 import BLOCK, FP8_DTYPE, quantize_tokens  # noqa: E402

DEV = torch.device("cuda")
SHAPES = {"gate_up": (4096, 7168), "down": (7168, 2048)}
# Prefill configurations compared: v2 (cp.async wgmma), v3 (TMA), v3 with clusters of two CTAs
# sharing the A tile (x2) or the B tile (b2).
VERSIONS = {
    "v2": "wg128n256",
    "v3": "tma128n256",
    "v3s": "tma128n256ss",
    "v3x2": "tma128n256x2",
    "v3b2": "tma128n256b2",
}
PREFILL = [(8, 512), (32, 256), (64, 128)]
DECODE = [(32, 1), (32, 4), (32, 16), (256, 1), (256, 4), (256, 16)]


def time_ms(fn, trial_ms: float = 40.0) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(2, min(200, int(trial_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def random_fp8(shape: tuple[int, ...]) -> torch.Tensor:
    """Random e4m3 values of a realistic spread, made one leading slice at a time."""
    out = torch.empty(shape, dtype=FP8_DTYPE, device=DEV)
    flat = out.view(-1, shape[-1]) if len(shape) > 1 else out.view(1, -1)
    step = max(1, (1 << 26) // shape[-1])
    for i in range(0, flat.shape[0], step):
        flat[i : i + step] = (torch.randn(flat[i : i + step].shape, device=DEV) * 64).to(FP8_DTYPE)
    return out


class Problem:
    """One grouped GEMM: G groups of m rows, weights [G, N, K], in every operand format."""

    def __init__(self, g: int, m: int, n: int, k: int, baselines: bool = True):
        self.g, self.m, self.n, self.k = g, m, n, k
        rows = g * m
        self.a8 = random_fp8((rows, k))
        self.a_s = torch.rand(rows, k // BLOCK, device=DEV) * 1e-2 + 1e-3
        self.b8 = random_fp8((g, n, k))
        self.b_s = torch.rand(g, n // BLOCK, k // BLOCK, device=DEV) * 1e-2 + 1e-3
        self.counts = torch.full((g,), m, dtype=torch.int32, device=DEV)
        self.offs = torch.cumsum(self.counts, 0, dtype=torch.int32)
        self.row_scale = torch.rand(rows, device=DEV) + 0.5
        self.col_scale = torch.rand(g, n, device=DEV) + 0.5
        self.baselines = baselines
        if baselines:
            self.a16 = self.a8.to(torch.bfloat16)
            self.b16 = self.b8.to(torch.bfloat16)

    @property
    def flop(self) -> float:
        return 2.0 * self.g * self.m * self.n * self.k

    def ours(self, config: str | None = None, max_ctas: int | None = None):
        if max_ctas is None:
            return lambda: grouped_gemm_fp8(
                self.a8, self.a_s, self.b8, self.b_s, self.counts, config=config
            )
        out = torch.empty(self.g * self.m, self.n, dtype=torch.bfloat16, device=DEV)
        args = (self.a8, self.a_s, self.b8, self.b_s, self.counts, out)
        return lambda: launch(EPI_BF16, config, *args, max_ctas=max_ctas)

    def scaled_grouped(self):
        bt = self.b8.transpose(1, 2)
        return lambda: torch._scaled_grouped_mm(
            self.a8, bt, self.row_scale, self.col_scale, offs=self.offs, out_dtype=torch.bfloat16
        )

    def grouped_bf16(self):
        bt = self.b16.transpose(1, 2)
        return lambda: torch._grouped_mm(self.a16, bt, offs=self.offs)

    def loop_bf16(self):
        def run():
            out = torch.empty(self.g * self.m, self.n, dtype=torch.bfloat16, device=DEV)
            for e in range(self.g):
                rows = slice(e * self.m, (e + 1) * self.m)
                torch.mm(self.a16[rows], self.b16[e].T, out=out[rows])
            return out

        return run


def measure(fn) -> float | None:
    try:
        return time_ms(fn)
    except Exception as e:  # a baseline this torch build lacks is reported, not fatal
        print(f"  (skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]})")
        return None


def fmt(x: float | None, spec: str = "8.0f") -> str:
    return "n/a".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def section_gemm(sizes: list[tuple[int, int]]) -> None:
    print("\n## Prefill grouped GEMM, TFLOP/s (ours: 1x128 act / 128x128 weight scales)")
    names = list(VERSIONS)
    print("ours: " + ", ".join(f"{v} = {c}" for v, c in VERSIONS.items()) + "; * = pick_config")
    base = ["scaled_grouped_mm fp8", "grouped_mm bf16", "bf16 loop"]
    cols = names + base + [f"{v} / scaled" for v in names]
    print("| shape | G x m | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, (n, k) in SHAPES.items():
        for g, m in sizes:
            p = Problem(g, m, n, k)
            fns = [p.ours(c) for c in VERSIONS.values()]
            fns += [p.scaled_grouped(), p.grouped_bf16(), p.loop_bf16()]
            tf = [None if t is None else p.flop / t / 1e9 for t in map(measure, fns)]
            scaled = tf[len(names)]
            ratios = [None if scaled is None or t is None else t / scaled for t in tf[: len(names)]]
            picked = pick_config(g * m, g, n)
            ours = zip(tf[: len(names)], VERSIONS.values(), strict=True)
            cells = [fmt(t, "4.0f") + ("*" if c == picked else "") for t, c in ours]
            cells += [fmt(t, "4.0f") for t in tf[len(names) :]]
            cells += [fmt(r, "4.2f") for r in ratios]
            print(f"| {name} | {g} x {m} | " + " | ".join(cells) + " |")
            del p
            torch.cuda.empty_cache()


def register_variant(name: str) -> str:
    """`base+KEY=VAL+...` -> a CONFIGS entry of that name: `base` with integer overrides."""
    base, *overrides = name.split("+")
    if overrides:
        cfg = dict(CONFIGS[base])
        for o in overrides:
            key, val = o.split("=")
            cfg[key] = int(val)
        CONFIGS[name] = cfg
    return name


def ratio_text(ours: float, scaled: float | None) -> str:
    return "" if scaled is None else f" ({ours / scaled:.2f})"


def section_configs(
    names: list[str], max_ctas: int | None, sizes: list[tuple[int, int]], passes: int
) -> None:
    names = [register_variant(c) for c in names]
    print(f"\n## Our kernel per tile configuration, TFLOP/s (ours / scaled), max_ctas {max_ctas}")
    cols = names + ["scaled_grouped_mm fp8"]
    print("| shape | G x m | pass | " + " | ".join(cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for name, (n, k) in SHAPES.items():
        for g, m in sizes:
            p = Problem(g, m, n, k, baselines=False)
            for i in range(passes):
                tf = [p.flop / time_ms(p.ours(c, max_ctas)) / 1e9 for c in names]
                t = measure(p.scaled_grouped())
                scaled = None if t is None else p.flop / t / 1e9
                cells = [f"{x:.0f}" + ratio_text(x, scaled) for x in tf]
                cells.append(fmt(scaled, "4.0f"))
                print(f"| {name} | {g} x {m} | {i + 1} | " + " | ".join(cells) + " |", flush=True)
            del p
            torch.cuda.empty_cache()


def clocks_under_load(fn, seconds: float = 1.2) -> tuple[float, float, float]:
    """(ms per call, median SM MHz, median W) over `seconds` of back-to-back calls of fn."""
    import pynvml  # nvidia-ml-py; imported here so the other sections do not need it

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    ms = time_ms(fn)
    reps = max(1, int(seconds * 1e3 / ms))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    mhz, watts = [], []
    while not end.query():
        mhz.append(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        watts.append(pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
        time.sleep(0.01)
    end.synchronize()
    half = len(mhz) // 2  # the second half: clocks settled under the load
    return (
        start.elapsed_time(end) / reps,
        statistics.median(mhz[half:]),
        statistics.median(watts[half:]),
    )


def section_clocks(names: list[str], sizes: list[tuple[int, int]]) -> None:
    names = [register_variant(c) for c in names]
    print("\n## Clocks under load: TFLOP/s, median SM MHz, median board W")
    print("| shape | G x m | kernel | TFLOP/s | SM MHz | W |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for g, m in sizes:
            p = Problem(g, m, n, k, baselines=False)
            runs = [(c, p.ours(c)) for c in names] + [("scaled_grouped_mm", p.scaled_grouped())]
            for label, fn in runs:
                ms, mhz, w = clocks_under_load(fn)
                print(
                    f"| {name} | {g} x {m} | {label} | {p.flop / ms / 1e9:.0f} | {mhz:.0f} "
                    f"| {w:.0f} |",
                    flush=True,
                )
            del p
            torch.cuda.empty_cache()


def section_decode() -> None:
    print("\n## Decode regime: weights streamed, GB/s (fp8 weights; bf16 weights for grouped_mm)")
    cols = "ours us | ours GB/s | scaled_grouped_mm GB/s | grouped_mm bf16 GB/s"
    print(f"| shape | G x m | config | {cols} |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        for g, m in DECODE:
            p = Problem(g, m, n, k)
            wbytes = g * n * k
            res = [measure(f) for f in (p.ours(), p.scaled_grouped(), p.grouped_bf16())]
            gbs = [
                None if t is None else wbytes * s / t / 1e6
                for t, s in zip(res, (1, 1, 2), strict=True)
            ]
            us = None if res[0] is None else res[0] * 1e3
            print(
                f"| {name} | {g} x {m} | {pick_config(g * m, g, n)} | {fmt(us)} "
                f"| {fmt(gbs[0])} | {fmt(gbs[1])} | {fmt(gbs[2])} |"
            )
            del p
            torch.cuda.empty_cache()


def weights13(a: dict) -> dict:
    return {k: a[k] for k in ("group_counts", "w13", "w13_scales")}


def section_worker() -> None:
    h, i, experts, total_experts, top_k = 7168, 2048, 32, 256, 8
    print(f"\n## Worker: {experts} experts of H={h}, I={i} (fp8), top-{top_k} of {total_experts}")
    w13 = random_fp8((experts, 2 * i, h))
    w13_s = torch.rand(experts, 2 * i // BLOCK, h // BLOCK, device=DEV) * 1e-3 + 1e-4
    w2 = random_fp8((experts, h, i))
    w2_s = torch.rand(experts, h // BLOCK, i // BLOCK, device=DEV) * 1e-3 + 1e-4
    print(
        "| tokens | rows | fused tok/s | fused ms | gate_up kernel ms | down kernel ms "
        "| unfused tok/s | unfused ms | torch twin tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens in (256, 4096):
        top = torch.rand(tokens, total_experts, device=DEV).topk(top_k, dim=1).indices
        mask = top < experts
        tok = torch.arange(tokens, device=DEV)[:, None].expand(tokens, top_k)[mask]
        exp = top[mask]
        order = torch.argsort(exp, stable=True)
        row_token, exp = tok[order].contiguous(), exp[order]
        counts = torch.bincount(exp, minlength=experts).to(torch.int32)
        x8, xs = quantize_tokens(torch.randn(tokens, h, device=DEV))
        args = dict(
            x8=x8[row_token].contiguous(),
            x_scales=xs[row_token].contiguous(),
            group_counts=counts,
            w13=w13,
            w13_scales=w13_s,
            w2=w2,
            w2_scales=w2_s,
            row_weights=torch.rand(row_token.numel(), device=DEV),
            row_token=row_token,
            num_tokens=tokens,
        )
        t_f = time_ms(lambda a=args: expert_mlp_fp8(**a))
        h8, hs = swiglu_quant_fp8(args["x8"], args["x_scales"], **weights13(args))
        t_gu = time_ms(lambda a=args: swiglu_quant_fp8(a["x8"], a["x_scales"], **weights13(a)))
        out = torch.zeros(tokens, h, device=DEV)
        down = (h8, hs, w2, w2_s, counts, out)
        cfg = pick_config(h8.shape[0], experts, h, scatter=True)
        routing = dict(row_weights=args["row_weights"], row_token=row_token)
        t_dn = time_ms(lambda d=down, c=cfg, r=routing: launch(EPI_WEIGHTED_ADD, c, *d, **r))
        t_u = time_ms(lambda a=args: expert_mlp_fp8_unfused(**a))
        t_t = time_ms(lambda a=args: expert_mlp_torch(**a), trial_ms=1.0)
        print(
            f"| {tokens} | {row_token.numel()} | {tokens / t_f * 1e3:.0f} | {t_f:.3f} | "
            f"{t_gu:.3f} | {t_dn:.3f} | "
            f"{tokens / t_u * 1e3:.0f} | {t_u:.3f} | {tokens / t_t * 1e3:.0f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="gemm,decode,worker")
    ap.add_argument(
        "--configs",
        default=",".join(c for c in CONFIGS if not c.startswith("swiglu")),
        help="configurations of the configs section",
    )
    ap.add_argument("--max-ctas", type=int, help="persistent grid cap in the configs section")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="gemm and configs sections")
    ap.add_argument("--sizes", help="G x m of the gemm and configs sections, e.g. 8x512,64x128")
    ap.add_argument("--passes", type=int, default=1, help="repeats of the configs table")
    ap.add_argument(
        "--prefill",
        choices=["v2", "v3"],
        default=grouped_gemm.PREFILL,
        help="prefill kernel that pick_config chooses (decode, worker sections)",
    )
    ap.add_argument(
        "--scatter", choices=["v2", "v3"], default=grouped_gemm.SCATTER,
        help="kernel of the down GEMM's weighted scatter-add when it is a prefill (worker section)",
    )  # fmt: skip
    args = ap.parse_args()
    grouped_gemm.PREFILL = args.prefill
    grouped_gemm.SCATTER = args.scatter
    for s in list(SHAPES):
        if s not in args.shapes.split(","):
            del SHAPES[s]
    parse = lambda v: [tuple(int(x) for x in s.split("x")) for s in v.split(",")]  # noqa: E731
    gemm_sizes = parse(args.sizes) if args.sizes else PREFILL
    config_sizes = parse(args.sizes) if args.sizes else PREFILL + [(32, 16), (256, 1)]
    print("command: python " + shlex.join(sys.argv))
    props = torch.cuda.get_device_properties(DEV)
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}")
    print(f"prefill kernel picked: {grouped_gemm.PREFILL}")
    torch.manual_seed(0)
    sections = dict(
        gemm=lambda: section_gemm(gemm_sizes),
        decode=section_decode,
        worker=section_worker,
        clocks=lambda: section_clocks(
            args.configs.split(","), parse(args.sizes) if args.sizes else [(8, 512)]
        ),
        configs=lambda: section_configs(
            args.configs.split(","), args.max_ctas, config_sizes, args.passes
        ),
    )
    for s in args.sections.split(","):
        sections[s]()


if __name__ == "__main__":
    main()
