"""CUDA graphs of the embedded engine's decode steps: one graph per decode position, kept across generations.

Why: a KV-cached decode step of the testbed model is a few hundred small kernels, and launching them from
Python costs more than running them (bench/results/engine_testbed_profile_cuda.txt: 1.77 s of host time
against 0.24 s on the GPU). Replaying a captured graph launches the whole step at once.

What a graph holds: the whole decode step, the model's forward and the sampler after it (softmax, the
inverse-CDF draw, writing the token and its log-prob, counting, marking stopped rows; `decode_state`), so the
host launches one graph per token and reads nothing back (the "all stopped?" flag is read late, without
blocking: `decode_state.StopReader`). The sampler in the graph was measured against the forward alone in it
(bench/results/engine_round13_h100/: 92,050 new tokens/s against 86,578 at 512 x 256).

Why one graph per position: megatron's static inference context (`StaticInferenceContext`) writes a step's key
and value at `sequence_len_offset` and attends over `[:offset + 1]` of the cache, both Python ints; a graph
bakes them in (and the sampler's position too), so the step at position p is its own graph. The set of graphs
(and the KV cache and decode state they read and write) belongs to one batch shape (rows B, cache length
S_ctx, whether routing is recorded, the temperature and the number of stop ids per row) and is reused by every
later generation of that shape, as long as the model's parameters stay where they are (the optimizer and the
engine's weight swaps for `lag` write them in place; a moved parameter drops the graphs).

How a position gets its graph: the first generation that reaches it runs the step eagerly (that result is
the step's result, and the warm-up capture needs), then captures the same step; later generations load their
prompts, uniforms and limits into the set's `DecodeState` (static buffers allocated outside the graphs) and
replay. A graph's own tensors are freed after its capture, so all graphs share one memory pool of about one
step's temporaries (replays run one at a time, in the decode loop's order).

What the step must allow (`graph_unsupported_reason`): no host reads inside the forward (the MoE layers on
the dispatcher-free path, `dense_moe_rows`; the reference attention's decode step reads nothing), no
collectives (one rank of model parallelism) and no random numbers drawn inside the forward (router noise).

Shape legend: [B] rows, [B, S_ctx] a set's token rows, [B, V] logits of one position.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

from .decode_state import DecodeState

__all__ = ["DecodeGraphs", "DecodeGraphSet", "graph_unsupported_reason", "context_length"]

# The KV cache of a graph set holds this multiple of positions: prompts of other lengths then share one set.
CONTEXT_BUCKET = 128


def context_length(positions: int) -> int:
    """The cache length S_ctx of the graph set that serves `positions` positions (rounded up to the bucket)."""
    return -(-positions // CONTEXT_BUCKET) * CONTEXT_BUCKET


def graph_unsupported_reason(*, device: torch.device, model_parallel_size: int, router_noise: float,
                             moe_reason: str | None, uses_kv_cache: bool) -> str | None:
    """None when the decode step can be captured, else why not (the engine then decodes eagerly). `moe_reason`:
    why some MoE layer would take megatron's dispatcher in a decode step (None: none would)."""
    if not uses_kv_cache:
        return "no KV cache for this engine (the recompute path's forwards change shape every token)"
    if device.type != "cuda":
        return f"device {device.type} (CUDA graphs need a CUDA device)"
    if model_parallel_size != 1:
        return f"model parallelism of {model_parallel_size} ranks (collectives inside the step)"
    if router_noise > 0:
        return "router noise (its random numbers are drawn per generation inside the forward)"
    if moe_reason is not None:
        return f"the MoE layers' decode steps take megatron's dispatcher, whose token counts are read on the host: {moe_reason}"
    return None


def _cuda_capture(fn: Callable[[], None], pool) -> Callable[[], None]:
    """Capture `fn` into a CUDA graph sharing `pool`; returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    return graph.replay


class DecodeGraphSet:
    """The graphs of one batch shape: their KV-cache context, the decode state they read and write (static
    buffers, `DecodeState.buffers`) and one graph per position. `capture(fn, pool)` returns a replay of `fn`
    (CUDA graphs by default; tests pass a stand-in)."""

    def __init__(self, context, state: DecodeState, device: torch.device, *, capture=_cuda_capture):
        self.context = context
        self.state = state
        self._replays: dict[int, Callable[[], None]] = {}
        self._capture = capture
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # Why a capture failed (None: none did). The step that failed keeps its eager result, later steps of the
        # generation run eagerly, and the engine stops using graphs.
        self.failed: str | None = None

    @property
    def num_graphs(self) -> int:
        return len(self._replays)

    def step(self, pos: int, run: Callable[[], None]) -> None:
        """The decode step that samples position `pos`: `run()` runs it eagerly on `state` (forward, sampler,
        update), with the context's offset at pos - 1. Replays its graph when there is one; else runs it (this
        step's result and the capture's warm-up) and captures it for the next generations."""
        replay = self._replays.get(pos)
        if replay is not None:
            replay()
            return
        run()
        if self.failed is not None:
            return
        try:
            self._replays[pos] = self._capture(run, self._pool)  # records only: the state keeps this step's result
        except Exception as e:  # an op of this model that cannot be captured (a host read, a collective)
            self.failed = f"capturing the decode step at position {pos} failed: {type(e).__name__}: {e}"


class DecodeGraphs:
    """The engine's graph sets, one per (rows, cache length, routing recorded), the `max_sets` most recently
    used kept (a training run has two shapes: rollouts and evaluation). `make_context(rows, length)` builds a
    KV-cache context; every set is dropped when a parameter of `model` moved since the sets were captured."""

    def __init__(self, model: torch.nn.Module, make_context, *, max_sets: int = 3, capture=_cuda_capture):
        self._model = model
        self._make_context = make_context
        self._max_sets = max_sets
        self._capture = capture
        self._sets: collections.OrderedDict = collections.OrderedDict()
        self._where = self._parameter_addresses()
        self.dropped = 0  # how many times the sets were dropped because parameters moved

    @property
    def num_graphs(self) -> int:
        """Graphs held, over all sets."""
        return sum(s.num_graphs for s in self._sets.values())

    def _parameter_addresses(self) -> tuple[int, ...]:
        return tuple(p.data_ptr() for p in self._model.parameters())

    def get(self, rows: int, positions: int, record: bool, device: torch.device, *, temperature: float,
            stop_width: int) -> DecodeGraphSet:
        """The set for `rows` rows of up to `positions` positions, sampling at `temperature` with `stop_width`
        stop ids per row (both are baked into the captured sampler), its context reset for a new generation."""
        where = self._parameter_addresses()
        if where != self._where:
            self._sets.clear()
            self._where = where
            self.dropped += 1
        length = context_length(positions)
        key = (rows, length, record, temperature, stop_width)
        graph_set = self._sets.pop(key, None)
        if graph_set is None:
            graph_set = DecodeGraphSet(self._make_context(rows, length),
                                       DecodeState.buffers(rows, length, stop_width, device), device,
                                       capture=self._capture)
            while len(self._sets) >= self._max_sets:
                self._sets.popitem(last=False)
        self._sets[key] = graph_set  # most recently used last
        graph_set.context.reset()
        return graph_set
