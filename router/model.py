"""The MoE language model as plain modules: everything except the routed experts.

Shapes: T = new tokens of the step, H = hidden, I = intermediate, k = experts per token,
R = rows whose logits are returned, V = vocabulary.

`MoEModel.forward(batch, cache)` embeds the step's tokens, runs each decoder layer (attention over
the KV cache, then a dense MLP or an MoE layer) and returns the logits of `batch.logits_rows`.
An MoE layer gates in float32, hands its tokens to the expert backend (`dispatch`), computes its
shared experts meanwhile, and adds the backend's `combine` result.

`forward_overlapped(batches, cache)` runs several micro-batches of one step in ping-pong: each
micro-batch's forward pauses after every MoE dispatch, and the next one computes its attention
while the first one's tokens are at the experts.

`set_profiler` attaches a `router.profiler.StepProfiler` (None by default: no timing at all); the
layers then time their phases, and the engine closes each step with `finish_step`.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from attention_worker.attention import GQAAttention, MLAAttention, RMSNorm
from attention_worker.batch import StepBatch
from attention_worker.kv_cache import KVCache
from attention_worker.rope import RotaryEmbedding
from moe_core.checkpoint import Checkpoint
from moe_core.errors import UnsupportedModelError
from moe_core.naming import load_dense
from moe_core.spec import ModelSpec
from router.expert_backend import ExpertBackend, ExpertsUnavailableError
from router.gating import Gate
from router.profiler import StepProfiler
from router.profiler import timed as _phase


class DenseMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): dense layers and shared experts."""

    def __init__(self, hidden: int, inter: int, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, H]


class MoELayer(nn.Module):
    """Gate + routed experts (behind the backend) + optional shared experts."""

    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertBackend) -> None:
        super().__init__()
        self.layer = layer
        self.experts = experts  # not a module: the routed weights live elsewhere
        self.profiler: StepProfiler | None = None
        self.gate = Gate(spec)
        self.shared = None
        self.shared_gate = None
        if spec.shared_intermediate_size:
            self.shared = DenseMLP(spec.hidden_size, spec.shared_intermediate_size, spec.mlp_bias)
        if spec.shared_expert_gate:
            self.shared_gate = nn.Linear(spec.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))

    def start(self, x: torch.Tensor) -> _PendingMoE:
        """Gates and dispatches x [T, H], then computes the shared experts while the routed ones
        run elsewhere."""
        profiler = self.profiler
        with _phase(profiler, "gating"):
            topk_ids, topk_weights = self.gate(x)  # [T, k] int64, [T, k] float32
        with _phase(profiler, "dispatch"):
            handle = self.experts.dispatch(self.layer, x, topk_ids, topk_weights)
        shared = None
        if self.shared is not None:
            with _phase(profiler, "shared_experts"):
                shared = self.shared_output(x)  # [T, H]
        return _PendingMoE(handle, shared, x.dtype)

    def finish(self, pending: _PendingMoE) -> torch.Tensor:
        """Waits for the routed experts -> [T, H], the layer's output."""
        with _phase(self.profiler, "combine"):
            routed = self.experts.combine(pending.handle)  # [T, H] float32
            return self.merge(routed, pending.shared, pending.dtype)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, H] -> the shared experts' output [T, H]; None when the layer has none."""
        if self.shared is None:
            return None
        shared = self.shared(x)  # [T, H]
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared  # [T, H]
        return shared

    @staticmethod
    def merge(routed: torch.Tensor, shared: torch.Tensor | None, dtype: torch.dtype):
        """routed [T, H] float32 (the backend's combine) + shared [T, H] -> [T, H] in dtype."""
        routed = routed.to(dtype)
        return routed if shared is None else routed + shared


@dataclass
class _PendingMoE:
    handle: object  # the backend's dispatch handle
    shared: torch.Tensor | None  # [T, H] shared experts' output
    dtype: torch.dtype


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int, experts: ExpertBackend) -> None:
        super().__init__()
        eps = spec.rms_norm_eps
        self.attn_norm = RMSNorm(spec.hidden_size, eps)
        attention = MLAAttention if spec.attention.kind == "mla" else GQAAttention
        self.attn = attention(spec, layer)
        self.mlp_norm = RMSNorm(spec.hidden_size, eps)
        self.is_moe = layer in spec.moe_layers
        if self.is_moe:
            self.mlp = MoELayer(spec, layer, experts)
        else:
            self.mlp = DenseMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias)
        self.profiler: StepProfiler | None = None

    def steps(self, x, layout, cache, rope, cos, sin) -> Generator[None, None, torch.Tensor]:
        """The layer's forward of x [T, H] -> [T, H], pausing once while an MoE layer's tokens
        are at the experts (`MoEModel` drives it)."""
        with _phase(self.profiler, "attention"):
            x = self.attend(x, layout, cache, rope, cos, sin)  # [T, H]
        if not self.is_moe:
            with _phase(self.profiler, "dense_mlp"):
                return self.dense(x)  # [T, H]
        pending = self.mlp.start(self.mlp_norm(x))  # the MoE layer times its own phases
        yield
        return x + self.mlp.finish(pending)  # [T, H]

    def attend(self, x, layout, cache, rope, cos, sin) -> torch.Tensor:
        """x [T, H] -> x + attention(norm(x)) [T, H]; writes the step's keys to the cache."""
        return x + self.attn(self.attn_norm(x), layout, cache, rope, cos, sin)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """A dense layer's MLP: x [T, H] -> x + mlp(norm(x)) [T, H]."""
        return x + self.mlp(self.mlp_norm(x))


class MoEModel(nn.Module):
    def __init__(self, spec: ModelSpec, experts: ExpertBackend) -> None:
        super().__init__()
        self.spec = spec
        self.experts = experts
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.rope = RotaryEmbedding(spec.rope)
        self.layers = nn.ModuleList(DecoderLayer(spec, i, experts) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.profiler: StepProfiler | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def set_profiler(self, profiler: StepProfiler | None) -> None:
        """Times the phases of every step with profiler (None: stop timing)."""
        self.profiler = profiler
        for layer in self.layers:
            layer.profiler = profiler
            if layer.is_moe:
                layer.mlp.profiler = profiler
        if hasattr(self.experts, "profiler"):
            self.experts.profiler = profiler

    def phase(self, name: str):
        """A context that times `name` when profiling (the engine's sampling), else nothing."""
        return _phase(self.profiler, name)

    def finish_step(self) -> None:
        """Ends the profiled step that `forward` started (no-op without a profiler)."""
        if self.profiler is not None:
            self.profiler.finish_step()

    @torch.no_grad()
    def forward(self, batch: StepBatch, cache: KVCache) -> torch.Tensor:
        """-> logits [R, V] float32 of batch.logits_rows; writes the step's keys to the cache."""
        steps = self._steps(batch, cache)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    @torch.no_grad()
    def forward_overlapped(
        self, batches: list[StepBatch], cache: KVCache
    ) -> tuple[list[torch.Tensor], list[dict[int, set[int]]]]:
        """The micro-batches of one step (disjoint sequences), interleaved layer by layer ->
        (logits [R_i, V] float32, the experts dropped per token row (`take_dropped`)) of each.

        Round robin: a micro-batch runs until its next dispatch, then the next one runs, so each
        one's attention overlaps the others' expert calls. An ExpertsUnavailableError's rows are
        made rows of the step (micro-batches' tokens in order)."""
        running = [self._steps(batch, cache) for batch in batches]
        offsets = [0]
        for batch in batches[:-1]:
            offsets.append(offsets[-1] + batch.num_tokens)
        logits: list[torch.Tensor | None] = [None] * len(batches)
        dropped: list[dict[int, set[int]]] = [{} for _ in batches]
        try:
            while any(steps is not None for steps in running):
                for i, steps in enumerate(running):
                    if steps is None:
                        continue
                    try:
                        next(steps)
                    except StopIteration as done:
                        logits[i], running[i] = done.value, None
                    except ExpertsUnavailableError as err:
                        raise err.shifted(offsets[i]) from err
                    finally:
                        for row, experts in self.experts.take_dropped().items():
                            dropped[i].setdefault(row, set()).update(experts)
        finally:
            for steps in running:
                if steps is not None:
                    steps.close()
        return logits, dropped

    def _steps(self, batch: StepBatch, cache: KVCache) -> Generator[None, None, torch.Tensor]:
        """forward, pausing after each MoE layer's dispatch."""
        lengths = [c + n for c, n in zip(batch.num_cached, batch.num_new, strict=True)]
        cache.check(batch.slots, lengths)
        if self.profiler is not None:
            self.profiler.start_step(decode=max(batch.num_new) == 1)
        with _phase(self.profiler, "embed"):
            layout = batch.layout()
            x, cos, sin = self.embed_tokens(batch.token_ids, batch.positions)
        for layer in self.layers:
            x = yield from layer.steps(x, layout, cache, self.rope, cos, sin)  # [T, H]
        with _phase(self.profiler, "lm_head"):
            return self.head(x[batch.logits_rows])  # [R, V]

    def embed_tokens(self, token_ids: torch.Tensor, positions: torch.Tensor):
        """token_ids, positions [T] int64 -> (x [T, H], cos, sin [T, d/2]): the embeddings and
        the rotary tables of the step."""
        x = self.embed(token_ids)  # [T, H]
        cos, sin = self.rope(positions, x.dtype)  # [T, d/2] each
        return x, cos, sin

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """x [R, H] (the rows whose logits are returned) -> logits [R, V] float32."""
        return self.lm_head(self.norm(x)).float()


def load_model(
    model_dir: str | os.PathLike,
    experts: ExpertBackend,
    device="cpu",
    dtype: torch.dtype = torch.float32,
) -> MoEModel:
    """Builds the model of model_dir with its dense weights in `dtype` on `device`; the routed
    experts are not read (they belong to `experts`). Gate weights stay float32."""
    spec = ModelSpec.from_dir(model_dir)
    ckpt = Checkpoint(model_dir)
    with torch.device("meta"):
        model = MoEModel(spec, experts)
    state = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as embed
        tensor = load_dense(ckpt, spec, name)
        if tuple(tensor.shape) != tuple(param.shape):
            raise UnsupportedModelError(
                f"{name}: checkpoint shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(param.shape)}"
            )
        keep_fp32 = name.endswith((".gate.weight", ".gate.bias"))
        state[name] = tensor.to(device, torch.float32 if keep_fp32 else dtype)
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
