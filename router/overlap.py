"""How many micro-batches a step is split into, so that attention overlaps the expert calls.

With one micro-batch a step costs about T_c + T_w: T_c the router's own work (attention, gating,
encoding, sampling) and T_w the time it waits for the workers (transport and expert compute). With
n micro-batches in ping-pong (`MoEModel.forward_overlapped`) one micro-batch computes while the
others' tokens are at the experts, so a step costs about

    T(n) = max(T_c, T_w) + min(T_c, T_w) / n + (n - 1) * L * call_cost_s

where L is the number of MoE layers and call_cost_s what one more round of expert calls per layer
costs (fixed per-call overhead). Per step size (tokens, in powers of two) `choose` first measures
T_c and T_w on unsplit steps, then takes the n with the smallest expected time: the measured step
time of n where n has run, the prediction T(n) where it has not. So a split that the model favours
is tried, and dropped again if it measures slower (e.g. where router and workers share the CPU and
nothing really runs in parallel). Unsplit steps are taken again every `refresh_steps` steps of a
size, so the choice follows the load. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Measured:
    compute_s: float  # EMA of T_c, from unsplit steps
    wait_s: float  # EMA of T_w, from unsplit steps
    step_s: dict[int, float] = field(default_factory=dict)  # EMA of the step time per n
    steps_since: int = 0  # steps of this size since the last unsplit one


@dataclass
class OverlapPolicy:
    moe_layers: int
    fixed: int | None = None  # a configured number of micro-batches; None = chosen from times
    max_micro_batches: int = 4
    call_cost_s: float = 3e-4  # an extra round of expert calls, per MoE layer
    refresh_steps: int = 32
    smoothing: float = 0.3  # weight of a new measurement in the EMAs
    _sizes: dict[int, _Measured] = field(default_factory=dict)

    def choose(self, num_seqs: int, num_tokens: int) -> int:
        """Micro-batches for a step of num_seqs sequences (num_tokens new tokens): 1 to
        min(max_micro_batches, num_seqs)."""
        most = max(1, min(self.max_micro_batches, num_seqs))
        if self.fixed is not None:
            return min(self.fixed, most)
        measured = self._sizes.get(_size(num_tokens))
        if measured is None or measured.steps_since >= self.refresh_steps:
            return 1  # measure (again) unsplit
        measured.steps_since += 1
        return min(range(1, most + 1), key=lambda n: self.expected(measured, n))

    def record(self, num_tokens: int, micro_batches: int, step_s: float, wait_s: float) -> None:
        """A step's wall time, and (meaningful for unsplit steps) the part spent waiting for the
        workers."""
        measured = self._sizes.get(_size(num_tokens))
        a = self.smoothing
        if measured is None:
            if micro_batches != 1:
                return
            measured = self._sizes[_size(num_tokens)] = _Measured(step_s - wait_s, wait_s)
        elif micro_batches == 1:
            compute_s = max(0.0, step_s - wait_s)
            measured.compute_s = (1 - a) * measured.compute_s + a * compute_s
            measured.wait_s = (1 - a) * measured.wait_s + a * wait_s
            measured.steps_since = 0
        old = measured.step_s.get(micro_batches)
        measured.step_s[micro_batches] = step_s if old is None else (1 - a) * old + a * step_s

    def expected(self, measured: _Measured, n: int) -> float:
        """The measured step time with n micro-batches, or the model's prediction before that."""
        if n in measured.step_s:
            return measured.step_s[n]
        c, w = measured.compute_s, measured.wait_s
        return max(c, w) + min(c, w) / n + (n - 1) * self.moe_layers * self.call_cost_s


def _size(num_tokens: int) -> int:
    return max(1, num_tokens).bit_length()


def split_evenly(token_counts: list[int], parts: int) -> list[int]:
    """Cuts a step's sequences (their new-token counts, in order) into `parts` contiguous runs of
    about equal tokens -> the run lengths (each at least 1 sequence)."""
    parts = max(1, min(parts, len(token_counts)))
    total = sum(token_counts)
    cuts: list[int] = []
    done = 0
    for i, count in enumerate(token_counts[:-1]):  # a cut may follow sequence i
        done += count
        k = len(cuts) + 1  # the cut this would be
        if k >= parts:
            break
        seqs_after = len(token_counts) - (i + 1)
        if done >= total * k / parts or seqs_after == parts - k:
            cuts.append(i + 1)
    bounds = [0, *cuts, len(token_counts)]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
