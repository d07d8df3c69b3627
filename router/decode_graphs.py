"""CUDA graphs for decode steps: the router's dense work between two MoE dispatches, replayed.

A decode step (every sequence feeds one token) launches some twenty small kernels per layer from
Python: norms, projections, rotary, the KV-cache write and read, attention, gating. At decode
batch sizes each takes microseconds on the GPU, so the step is bound by the launches and by the
interpreter that issues them. Here each stretch of the step between two MoE dispatches is
captured once as a CUDA graph and replayed with one launch:

    segment 0      embedding, rotary tables, the layers up to the first MoE layer's gate
    shared j       MoE layer j's shared experts (replayed after its dispatch, so they run while
                   the workers compute)
    segment j      adds MoE layer j - 1's routed and shared outputs, then the layers up to MoE
                   layer j's gate; the last segment ends with the final norm and the LM head

Between them the router dispatches and combines as usual (Python, gRPC). Segments read and
write static buffers of `max_batch` rows (the hidden state, the MoE input, the top-k choice, the
shared experts' output, the combined rows, the logits), so a bucket's graphs keep no tensors of
their own beyond the pool's temporaries.

With a backend that takes staged tokens (`staged_precision`: the remote one), segment j also
converts MoE layer j's input to the wire format and copies it, with the top-k, into pinned host
memory (`_Staged`). The step then replays the shared experts at once and waits for those copies
alone: the dispatch that follows launches nothing on the GPU and waits for nothing, and the
shared experts run while it plans and sends.

Shapes are static in a graph, so a step is padded to a bucket: B sequences to the next power of
two (at most `max_batch`), its longest cache length L to the next power of two from
`MIN_LENGTH` (at most the cache's `max_len`). Padding rows use a spare KV-cache slot at
position 0 and are never dispatched. Each bucket is captured on its first use; all buckets share
one memory pool, whose temporaries every graph may reuse: a step replays one bucket's graphs
one after the other, and nothing but the static buffers lives from one graph to the next. The
logits are copied out before `forward` returns.

`capture=False` runs the same padded segments without graphs (a CPU has none): the tests use it
to check the padding and the segment boundaries against the plain forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attention_worker.batch import BatchLayout, StepBatch
from attention_worker.kv_cache import KVCache
from moe_core import token_format
from moe_core.precision import Precision
from router.dispatch import WireTokens
from router.metrics import RouterMetrics
from router.model import MoELayer, MoEModel
from router.profiler import timed

log = logging.getLogger(__name__)

MIN_LENGTH = 64  # smallest cache-length bucket


def bucket(n: int, limit: int, smallest: int = 1) -> int:
    """The next power of two >= max(n, smallest), at most limit (n <= limit)."""
    return min(1 << (max(n, smallest) - 1).bit_length(), limit)


@dataclass
class _Segment:
    """One stretch of the step: `run` computes it from the static buffers into the static
    buffers; once captured, `replay` reruns its graph."""

    run: Callable[[], None]
    graph: torch.cuda.CUDAGraph | None = None

    def replay(self) -> None:
        if self.graph is None:
            self.run()
        else:
            self.graph.replay()


@dataclass
class _Buffers:
    """What lives between the segments of a step, max_batch rows each (a bucket uses the first
    Bp): the hidden state x and the MoE layer's input h [., H] (model dtype), its top-k ids
    [., k] int64 and weights [., k] float32, the shared experts' output [., H], the combined
    routed rows [., H] float32, the rotary tables [., d/2] and the logits [., V] float32."""

    x: torch.Tensor
    h: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    shared: torch.Tensor
    routed: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    logits: torch.Tensor


@dataclass
class _Staged:
    """Pinned host memory that the segments write a dispatch's inputs into, max_batch rows each
    (a step uses the first B): the MoE input in the wire format of `precision` (data [., row
    bytes] uint8, scales [., scale bytes] uint8 or None) and the top-k ids [., k] int64 and
    weights [., k] float32."""

    precision: Precision
    data: torch.Tensor
    scales: torch.Tensor | None
    ids: torch.Tensor
    w: torch.Tensor

    @classmethod
    def allocate(
        cls, precision: Precision, rows: int, hidden: int, top_k: int, pin: bool
    ) -> _Staged:
        data_bytes, scale_bytes = WireTokens.row_widths(hidden, precision)

        def host(columns: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(rows, columns, dtype=dtype, pin_memory=pin)

        scales = host(scale_bytes, torch.uint8) if scale_bytes else None
        ids, w = host(top_k, torch.int64), host(top_k, torch.float32)
        return cls(precision, host(data_bytes, torch.uint8), scales, ids, w)

    def write(self, h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """h [B, H], ids [B, k] int64, w [B, k] float32 on the device -> the first B rows, by
        asynchronous copies (part of the segment's graph)."""
        b = h.shape[0]
        tokens = WireTokens.of(h, self.precision)
        self.data[:b].copy_(tokens.data, non_blocking=True)
        if self.scales is not None:
            self.scales[:b].copy_(tokens.scales, non_blocking=True)
        self.ids[:b].copy_(ids, non_blocking=True)
        self.w[:b].copy_(w, non_blocking=True)

    def tokens(self, b: int) -> WireTokens:
        """The first b rows, as the `staged` tokens of a dispatch."""
        scales = None if self.scales is None else self.scales[:b]
        return WireTokens(token_format.token_format(self.precision), self.data[:b], scales)


@dataclass
class _Bucket:
    """The segments of one (batch, length) bucket, in the order a step runs them."""

    batch: int
    length: int
    main: list[_Segment]  # segment j, j = 0 .. number of MoE layers
    shared: list[_Segment | None]  # shared experts of MoE layer j (None: the layer has none)

    def in_order(self) -> list[_Segment]:
        order = []
        for j, segment in enumerate(self.main):
            order.append(segment)
            if j < len(self.shared) and self.shared[j] is not None:
                order.append(self.shared[j])
        return order


def cache_and_graphs(
    model: MoEModel,
    max_batch: int,
    max_len: int,
    device: str | torch.device,
    dtype: torch.dtype,
    graphs: bool = True,
    metrics: RouterMetrics | None = None,
) -> tuple[KVCache, DecodeGraphs | None]:
    """The KV cache for max_batch sequences of max_len, and the graphs over it when `graphs`
    and the device is a GPU (None otherwise): their cache has one more slot, for padding."""
    graphs = graphs and torch.device(device).type == "cuda"
    cache = KVCache(model.spec, max_batch + graphs, max_len, device, dtype)
    return cache, DecodeGraphs(model, cache, max_batch, metrics=metrics) if graphs else None


class DecodeGraphs:
    """Runs decode steps of `model` over `cache` from captured segments (see the module doc).

    Takes one slot of `cache` for the padding rows: size the cache one slot larger.
    """

    def __init__(
        self,
        model: MoEModel,
        cache: KVCache,
        max_batch: int,
        capture: bool = True,
        metrics: RouterMetrics | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.cache = cache
        self.metrics = metrics
        self.max_batch = max_batch
        self.capture = capture and cache.device.type == "cuda"
        self.spare = cache.allocate()  # padding rows write their keys here
        self.moe_layers = [i for i, layer in enumerate(model.layers) if layer.is_moe]
        device = cache.device
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        # positions (= cache index of the new token) and slots: [2, B], from pinned host memory
        self.index = torch.zeros(2, max_batch, dtype=torch.int64, device=device)
        self._host = torch.zeros(2, max_batch, dtype=torch.int64, pin_memory=self.capture)
        self._copied: torch.cuda.Event | None = None
        self.arange = torch.arange(max_batch, device=device)  # [B] row -> its own sequence
        self.zeros = torch.zeros(max_batch, dtype=torch.int64, device=device)  # [B]
        self.buffers = self._buffers(max_batch)
        precision = model.experts.staged_precision
        self.staged = None  # the dispatch's inputs on the host, for backends that take them
        self._written: torch.cuda.Event | None = None  # when a segment's copies to it are done
        if precision is not None:
            spec = model.spec
            self.staged = _Staged.allocate(
                precision, max_batch, spec.hidden_size, spec.top_k, pin=self.capture
            )
            self._written = torch.cuda.Event() if self.capture else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._stream: torch.cuda.Stream | None = None  # where graphs are captured
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.failed: str | None = None  # why capturing failed; then every step runs eagerly

    def accepts(self, batch: StepBatch) -> bool:
        """Whether `forward` runs `batch` from graphs: a decode step of at most max_batch
        sequences, as long as no capture has failed."""
        return (
            self.failed is None and max(batch.num_new) == 1 and len(batch.slots) <= self.max_batch
        )

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """-> logits [R, V] float32 of batch.logits_rows, as `model.forward(batch, cache)`."""
        if not self.accepts(batch):
            return self.model.forward(batch, self.cache)
        b = len(batch.slots)
        lengths = [c + 1 for c in batch.num_cached]
        self.cache.check(batch.slots, lengths)
        shape = (bucket(b, self.max_batch), bucket(max(lengths), self.cache.max_len, MIN_LENGTH))
        graphs = self.buckets.get(shape)
        if graphs is None:
            graphs = self._capture(*shape)
            if graphs is None:
                return self.model.forward(batch, self.cache)
        self._load(batch, graphs.batch)
        logits = self._replay(graphs, b).index_select(0, batch.logits_rows)
        if self.metrics is not None:
            self.metrics.record_graph_step()
        return logits

    def _replay(self, graphs: _Bucket, b: int) -> torch.Tensor:
        """One step from the loaded inputs -> logits [Bp, V] of every (padded) row."""
        model, profiler = self.model, self.model.profiler
        if profiler is not None:
            profiler.start_step(decode=True)
        buf, staged = self.buffers, self.staged
        for j, layer in enumerate(self.moe_layers):
            with timed(profiler, "graphs"):
                graphs.main[j].replay()
            if staged is None:
                with timed(profiler, "dispatch"):
                    handle = model.experts.dispatch(layer, buf.h[:b], buf.ids[:b], buf.w[:b])
                self._shared_experts(graphs, j)
            else:  # the shared experts go to the GPU first, and run while the host dispatches
                if self._written is not None:
                    self._written.record()  # after the segment's copies to the host
                self._shared_experts(graphs, j)
                with timed(profiler, "dispatch"):
                    if self._written is not None:
                        self._written.synchronize()  # that is all dispatch waits for
                    tokens, ids, w = staged.tokens(b), staged.ids[:b], staged.w[:b]
                    handle = model.experts.dispatch(layer, buf.h[:b], ids, w, staged=tokens)
            with timed(profiler, "combine"):
                buf.routed[:b].copy_(model.experts.combine(handle))  # [B, H] float32
        with timed(profiler, "graphs"):
            graphs.main[-1].replay()
        return buf.logits[: graphs.batch]

    def _shared_experts(self, graphs: _Bucket, j: int) -> None:
        if graphs.shared[j] is not None:
            with timed(self.model.profiler, "shared_experts"):
                graphs.shared[j].replay()

    def _load(self, batch: StepBatch, padded: int) -> None:
        """Writes the step's tokens, positions and slots (padding rows: position 0 of the spare
        slot) into the static inputs."""
        b = len(batch.slots)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the host buffer
        host = self._host.numpy()
        host[0, :b] = batch.num_cached  # decode: the new token's position is the cached count
        host[1, :b] = batch.slots
        host[0, b:padded] = 0
        host[1, b:padded] = self.spare
        self.index[:, :padded].copy_(self._host[:, :padded], non_blocking=True)
        if self.capture:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.token_ids[:b].copy_(batch.token_ids)

    def _layout(self, b: int, length: int) -> BatchLayout:
        """The attention layout of a padded decode step of b rows (built inside each segment,
        so that the masks it computes are part of the graph)."""
        positions, slots = self.index[0, :b], self.index[1, :b]
        return BatchLayout(
            token_seq=self.arange[:b],
            token_row=self.zeros[:b],
            token_slot=slots,
            cache_index=positions,
            slots=slots,
            query_index=positions[:, None],
            max_new=1,
            max_len=length,
        )

    def _buffers(self, rows: int) -> _Buffers:
        model, device = self.model, self.cache.device
        spec, dtype = model.spec, model.dtype
        with torch.no_grad():
            cos, _ = model.rope(torch.zeros(1, dtype=torch.int64, device=device), dtype)
        hidden = (rows, spec.hidden_size)
        return _Buffers(
            x=torch.zeros(hidden, dtype=dtype, device=device),
            h=torch.zeros(hidden, dtype=dtype, device=device),
            ids=torch.zeros(rows, spec.top_k, dtype=torch.int64, device=device),
            w=torch.zeros(rows, spec.top_k, dtype=torch.float32, device=device),
            shared=torch.zeros(hidden, dtype=dtype, device=device),
            routed=torch.zeros(hidden, dtype=torch.float32, device=device),
            cos=torch.zeros(rows, cos.shape[-1], dtype=dtype, device=device),
            sin=torch.zeros(rows, cos.shape[-1], dtype=dtype, device=device),
            logits=torch.zeros(rows, spec.vocab_size, dtype=torch.float32, device=device),
        )

    def _segments(self, b: int, length: int) -> _Bucket:
        """The segment functions of one bucket of b rows (not yet run)."""
        model, cache, moe, buf = self.model, self.cache, self.moe_layers, self.buffers
        has_shared = [model.layers[i].mlp.shared is not None for i in moe]

        def stretch(j: int) -> Callable[[], None]:
            first = 0 if j == 0 else moe[j - 1] + 1
            last = moe[j] if j < len(moe) else len(model.layers)

            def run() -> None:
                layout = self._layout(b, length)
                if j == 0:
                    x, cos, sin = model.embed_tokens(self.token_ids[:b], self.index[0, :b])
                    buf.cos[:b].copy_(cos)
                    buf.sin[:b].copy_(sin)
                else:
                    shared = buf.shared[:b] if has_shared[j - 1] else None
                    x = buf.x[:b] + MoELayer.merge(buf.routed[:b], shared, buf.x.dtype)
                cos, sin = buf.cos[:b], buf.sin[:b]
                for layer in model.layers[first:last]:  # dense layers
                    x = layer.dense(layer.attend(x, layout, cache, model.rope, cos, sin))
                if j == len(moe):
                    buf.logits[:b].copy_(model.head(x))  # [Bp, V] float32
                    return
                layer = model.layers[last]
                x = layer.attend(x, layout, cache, model.rope, cos, sin)  # [Bp, H]
                buf.x[:b].copy_(x)
                buf.h[:b].copy_(layer.mlp_norm(x))  # [Bp, H]
                ids, w = layer.mlp.gate(buf.h[:b])  # [Bp, k] int64, [Bp, k] float32
                if self.staged is not None:
                    self.staged.write(buf.h[:b], ids, w)
                else:
                    buf.ids[:b].copy_(ids)
                    buf.w[:b].copy_(w)

            return run

        def shared_experts(j: int) -> Callable[[], None]:
            mlp = model.layers[moe[j]].mlp
            return lambda: buf.shared[:b].copy_(mlp.shared_output(buf.h[:b]))  # [Bp, H]

        main = [_Segment(stretch(j)) for j in range(len(moe) + 1)]
        shared = [_Segment(shared_experts(j)) if has_shared[j] else None for j in range(len(moe))]
        return _Bucket(b, length, main, shared)

    def _capture(self, b: int, length: int) -> _Bucket | None:
        """Builds (and on a GPU captures) the bucket; None when capturing failed (logged, and
        graphs stay off from then on)."""
        started = time.perf_counter()
        graphs = self._segments(b, length)
        self.index[0, :b] = 0  # a valid step for the warm-up: every row on the spare slot
        self.index[1, :b] = self.spare
        try:
            if self.capture:
                self._record(graphs)
            else:
                for segment in graphs.in_order():
                    segment.replay()
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager path working
            self.failed = f"{type(exc).__name__}: {exc}"
            log.warning("CUDA graphs off, decode steps run eagerly: capturing failed: %s", exc)
            return None
        self.buckets[(b, length)] = graphs
        seconds = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.record_graph_capture(seconds)
        log.info(
            "decode graphs for %d sequences, cache length %d: %d segments in %.0f ms",
            b,
            length,
            len(graphs.in_order()),
            1e3 * seconds,
        )
        return graphs

    def _record(self, graphs: _Bucket) -> None:
        """Warms the segments up (library handles, workspaces; on the current stream, so that
        the blocks it leaves cached serve later eager steps), then captures each one in order
        into the shared pool, on a side stream. (Not `torch.cuda.graph`: it empties the
        allocator's cache before every capture.) thread_local: other threads of the router may
        use CUDA meanwhile."""
        device = self.cache.device
        for segment in graphs.in_order():
            segment.replay()
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        main = torch.cuda.current_stream(device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            for segment in graphs.in_order():
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
                try:
                    segment.run()
                except BaseException:
                    with contextlib.suppress(RuntimeError):  # the run's error is the one to see
                        graph.capture_end()
                    raise
                graph.capture_end()
                segment.graph = graph
        main.wait_stream(self._stream)
