"""CUDA graphs of the embedded engine's decode steps: one graph per decode position, kept across generations.

Why: a KV-cached decode step of the testbed model is a few hundred small kernels, and launching them from
Python costs more than running them (bench/results/engine_testbed_profile_cuda.txt: 1.77 s of host time
against 0.24 s on the GPU). Replaying a captured graph launches the whole step at once.

Why one graph per position: megatron's static inference context (`StaticInferenceContext`) writes a step's key
and value at `sequence_len_offset` and attends over `[:offset + 1]` of the cache, both Python ints; a graph
bakes them in, so the step at position p is its own graph. The set of graphs (and the KV cache they write)
belongs to one batch shape (rows B, cache length S_ctx, whether routing is recorded) and is reused by every
later generation of that shape, as long as the model's parameters stay where they are (the optimizer and the
engine's weight swaps for `lag` write them in place; a moved parameter drops the graphs).

How a position gets its graph: the first generation that reaches it runs the step eagerly (that result is
the step's result: the warm-up capture needs), then captures the same step; later generations copy their
token column into the static input and replay. Inputs and outputs live in buffers allocated outside the
graphs (tokens [B, 1], positions [B, 1], logits [B, V], routing [L, B, K]); a graph's own tensors are freed
after its capture, so all graphs share one memory pool of about one step's temporaries (replays run one at a
time, in the decode loop's order). The decode loop's sampler runs eagerly after each replay.

What the step must allow (`graph_unsupported_reason`): no host reads inside the forward (the MoE layers on
the dispatcher-free path, `dense_moe_rows`; the reference attention's decode step reads nothing), no
collectives (one rank of model parallelism) and no random numbers drawn inside the forward (router noise).

Shape legend: [B] rows, [B, 1] one decode position's input, [B, V] logits of one position, [L, B, K]
recorded top-k experts per MoE layer for one position.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import torch

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
    """The graphs of one batch shape: their KV-cache context, static inputs / outputs and one graph per
    position. `capture(fn, pool)` returns a replay of `fn` (CUDA graphs by default; tests pass a stand-in)."""

    def __init__(self, context, rows: int, device: torch.device, *, capture=_cuda_capture):
        self.context = context
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [B, 1] static input
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)  # [B, 1]
        self.logits: torch.Tensor | None = None  # [B, V] static output, allocated by the first step
        self.routes: torch.Tensor | None = None  # [L, B, K] static output when routing is recorded
        self._replays: dict[int, Callable[[], None]] = {}
        self._capture = capture
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        # Why a capture failed (None: none did). The step that failed keeps its eager result, later steps of the
        # generation run eagerly, and the engine stops using graphs.
        self.failed: str | None = None

    @property
    def num_graphs(self) -> int:
        return len(self._replays)

    def step(self, pos: int, token_column: torch.Tensor,
             forward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]):
        """The decode step predicting position `pos` from `token_column` [B, 1] (the tokens at pos - 1), with the
        context's offset at pos - 1. `forward(tokens, positions)` runs the model on the static inputs and
        returns ([B, V] logits, [L, B, K] routing or None). Returns the static (logits, routing) buffers,
        valid until the next step."""
        self.tokens.copy_(token_column)
        self.positions.fill_(pos - 1)
        replay = self._replays.get(pos)
        if replay is not None:
            replay()
            return self.logits, self.routes
        if self.failed is not None:
            return forward(self.tokens, self.positions)

        def run() -> None:
            logits, routes = forward(self.tokens, self.positions)
            self.logits.copy_(logits)
            if routes is not None:
                self.routes.copy_(routes)

        logits, routes = forward(self.tokens, self.positions)  # eager: this step's result and the warm-up
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        if routes is not None and self.routes is None:
            self.routes = torch.empty_like(routes)
        self.logits.copy_(logits)
        if routes is not None:
            self.routes.copy_(routes)
        del logits, routes
        try:
            self._replays[pos] = self._capture(run, self._pool)  # records only: the buffers keep this step's result
        except Exception as e:  # an op of this model that cannot be captured (a host read, a collective)
            self.failed = f"capturing the decode step at position {pos} failed: {type(e).__name__}: {e}"
        return self.logits, self.routes


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

    def get(self, rows: int, positions: int, record: bool, device: torch.device) -> DecodeGraphSet:
        """The set for `rows` rows of up to `positions` positions (its context reset for a new generation)."""
        where = self._parameter_addresses()
        if where != self._where:
            self._sets.clear()
            self._where = where
            self.dropped += 1
        key = (rows, context_length(positions), record)
        graph_set = self._sets.pop(key, None)
        if graph_set is None:
            graph_set = DecodeGraphSet(self._make_context(rows, key[1]), rows, device, capture=self._capture)
            while len(self._sets) >= self._max_sets:
                self._sets.popitem(last=False)
        self._sets[key] = graph_set  # most recently used last
        graph_set.context.reset()
        return graph_set
