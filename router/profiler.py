"""Optional per-phase timing of the router's steps (`moe-router serve --profile-steps`).

Off by default: the model then calls no profiler at all. When on, every phase boundary
synchronizes the device, so each phase's time is the wall time its kernels and host work took;
the synchronizations remove the overlap of host and device work, so profiled steps run a little
slower than unprofiled ones (measure throughput without it).

Phases (exclusive: a phase nested in another is not counted in its parent):

| phase | what |
| --- | --- |
| `embed` | token embedding and rotary tables |
| `attention` | the attention norm and attention of every layer (KV cache included) |
| `dense_mlp` | the MLP of dense layers |
| `gating` | the MoE layers' gates (top-k choice) |
| `dispatch` | handing the tokens to the expert backend: routing plan, encoding, sending |
| `shared_experts` | shared experts (they overlap the workers' compute in the remote backend) |
| `experts` | the routed experts: waiting for the workers (compute + transport), or in-process |
| `combine` | decoding the workers' results and adding them up, then the residual add |
| `lm_head` | final norm and output head |
| `graphs` | decode steps under CUDA graphs: the replays of the dense segments (below) |
| `sampling` | picking the next tokens |

A decode step run from CUDA graphs (router.decode_graphs) replays its embedding, attention,
norms, dense MLPs, gating and LM head as a few graphs, timed as `graphs`: those phases are then 0,
and `combine` leaves out the residual add (it is in the next graph).

`worker_compute` (remote backend) is informational, not a phase: per MoE layer the longest
`compute_seconds` that a worker reported, summed over layers; it is part of `experts`.
A step is a decode step when every sequence feeds one token, else a prefill step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

PHASES = (
    "embed",
    "attention",
    "dense_mlp",
    "gating",
    "dispatch",
    "shared_experts",
    "experts",
    "combine",
    "lm_head",
    "graphs",
    "sampling",
)
INFO = ("worker_compute",)


def timed(profiler: StepProfiler | None, name: str):
    """`profiler.phase(name)`, or a context that does nothing when profiler is None."""
    return contextlib.nullcontext() if profiler is None else profiler.phase(name)


class StepProfiler:
    """Accumulates the phases of the current step; `finish_step` hands them to `sink`.

    sink(kind, seconds_by_phase, step_seconds): kind is "decode" or "prefill"; seconds_by_phase
    holds every name of PHASES and INFO (0.0 when a phase did not run). Used from one thread
    (the router's step thread).
    """

    def __init__(self, device: torch.device | str, sink) -> None:
        self.device = torch.device(device)
        self.sink = sink
        self._kind: str | None = None
        self._start = 0.0
        self._seconds: dict[str, float] = {}
        self._stack: list[list[float]] = []  # per open phase: [start, seconds of its children]
        self.last: tuple[str, dict[str, float], float] | None = None  # the last finished step

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start_step(self, decode: bool) -> None:
        """Starts a step (a step that failed before finishing is dropped)."""
        self._sync()
        self._kind = "decode" if decode else "prefill"
        self._seconds = dict.fromkeys(PHASES + INFO, 0.0)
        self._stack = []
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as `name`, minus the phases nested in it."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        self._sync()
        frame = [time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._sync()
            self._stack.pop()
            elapsed = time.perf_counter() - frame[0]
            if self._kind is not None:
                self._seconds[name] += elapsed - frame[1]
            if self._stack:
                self._stack[-1][1] += elapsed

    def add_info(self, name: str, seconds: float) -> None:
        """Adds to an informational figure (INFO) of the step."""
        if name not in INFO:
            raise ValueError(f"unknown figure {name!r}; figures: {', '.join(INFO)}")
        if self._kind is not None:
            self._seconds[name] += seconds

    def finish_step(self) -> None:
        """Ends the step and reports it; does nothing when no step was started."""
        if self._kind is None:
            return
        self._sync()
        total = time.perf_counter() - self._start
        self.last = (self._kind, self._seconds, total)
        self.sink(self._kind, self._seconds, total)
        self._kind = None
