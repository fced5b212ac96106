"""The embedded rollout engine: the policy's own megatron model sampling in inference mode, same processes.

Used by default (no server). Each data-parallel rank generates for its own requests; every rank of one
model-parallel group (TP / CP / EP / PP) calls `generate` with the same requests and the same `seed`, runs
the model forward through megatron's schedule (forward only, pipeline p2p included) and gets the same
tokens.

Decoding (`kv_cache=True`, the default): KV-cached and batched. All of a rank's requests decode together
through megatron-core's static inference context (see `kv_cache` for the layouts it covers): one prefill over
the shortest prompt, then one position per step for every row (rows still inside their prompt feed their
prompt token); each row stops at its EOS / stop token / max_new_tokens and the loop ends when all have.
Layouts the cache cannot serve (CP) and `kv_cache=False` use the recompute path: the whole prefix is
recomputed for every position (the reference the cache is tested against). Both paths run the same loop and
sampler: row b's k-th new token is the inverse-CDF draw of a uniform u[b, k] pre-drawn from `seed`, so equal
probabilities give equal tokens whatever the batching.

The loop's state (rows, uniforms, log-probs, counts, stopped rows) and its sampler are `decode_state`'s.
`dense_moe_rows` > 0 lets the MoE layers skip megatron's dispatcher on the cached path's small forwards (decode
steps): every expert on every token, masked, no host read (`megatron.small_batch_moe`); `stop_check_every` > 1
reads the loop's "all rows stopped?" on the host only every that many steps, and on CUDA the flag read is
`stop_read_lag` steps old, copied without blocking (stopped rows ride along, unchanged).
`cuda_graphs` (the default) replays each decode step, forward and sampler, as a CUDA graph captured once per
position and batch shape (`rollout.decode_graphs`: the same kernels, so the same tokens; CPU runs and layouts it
cannot serve decode eagerly, with the reason in `graph_reason`; a capture that fails turns graphs off for the
engine, with a warning). `compile_decode` runs the decode steps' forward through torch.compile (fused kernels,
`rollout.compiled_decode`; off by default: it rounds differently from the trainer's eager forward), and
`decode_attention="bmm"` attends a decode step's query with batched matmuls instead of SDPA (while generating).

A real train/inference mismatch can be switched on: `precision="bf16"` runs the engine's forward under bf16
autocast while the trainer stays in fp32; `fp8` fake-quantises the attention and expert GEMMs (e4m3, per
tensor or per row) and `router_noise` perturbs the router logits (`rollout.mismatch`), only inside the
engine's forward. `lag` > 0 samples with the weights of `lag` syncs ago (fully asynchronous training,
emulated deterministically): every generation carries the weight version that made it.

R3: with `record_routing`, the routing recorded is the one each token got when the engine processed it: on
the cached path the prefill's routing for the prompt's first positions and each decode step's routing for its
position (prefill and decode can route differently: a real source of mismatch); on the recompute path one
more recorded forward over the final sequences (causal: each token's routing is what it got when processed).

Shape legend: [B] requests, [B, S] token rows (right padding), [B, V] logits of one position, [B, N] per new
token (N = max new tokens), [L, S, B, K] recorded top-k experts per MoE layer and position.
"""

from __future__ import annotations

import collections
import contextlib
import logging

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer

from vespo_megatron.compat import (
    RouterReplay,
    RouterReplayAction,
    get_forward_backward_func,
    static_inference_context,
    unwrap_model,
)
from vespo_megatron.megatron import reference_attention
from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.megatron.small_batch_moe import SmallBatchMoELayer, dense_small_batches
from vespo_megatron.parallel.cp_split import round_up, zigzag_indices
from vespo_megatron.parallel.sequence import comm_device
from vespo_megatron.routing import RoutingRecord
from vespo_megatron.routing.record import compact_dtype

from .compiled_decode import CompiledDecode, compile_unsupported_reason
from .decode_graphs import DecodeGraphs, graph_unsupported_reason
from .decode_state import DecodeState, StopReader
from .embedded_config import EmbeddedEngineConfig
from .engine import Generation, GenerationRequest, PolicyWeights, SampleError
from .kv_cache import kv_cache_unsupported_reason, sequence_parallel_off
from .mismatch import engine_mismatch

__all__ = ["EmbeddedEngineConfig", "EmbeddedEngine"]

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _decode_kernel(kernel: str):
    """The reference attention's decode-step kernel (`decode_attention`) while the engine generates."""
    before, reference_attention.DECODE_KERNEL = reference_attention.DECODE_KERNEL, kernel
    try:
        yield
    finally:
        reference_attention.DECODE_KERNEL = before


class EmbeddedEngine:
    def __init__(self, cfg: EmbeddedEngineConfig, model, groups, *, vocab_size: int, eos_id: int,
                 moe_layers: tuple[int, ...] = (), num_experts: int | None = None, record_routing: bool = False):
        if record_routing and groups.tp_size * groups.cp_size * groups.pp_size != 1:
            raise ValueError(
                "record_routing: the embedded engine records routing only where one rank "
                f"sees every token of every MoE layer (tp = cp = pp = 1), got tp={groups.tp_size}, "
                f"cp={groups.cp_size}, pp={groups.pp_size}; use routing_replay='r2' or SGLang (R3) instead"
            )
        self.cfg = cfg
        self.record_routing = record_routing  # R3: record the routing used at generation
        self.model = model  # the (DDP-wrapped) training model: its weights are swapped in for lagged versions
        self.groups = groups
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.moe_layers = tuple(moe_layers)
        self.num_experts = num_experts
        self._version = 0
        self._snapshots: collections.deque = collections.deque(maxlen=cfg.lag + 1)
        self._pad_multiple = 2 * groups.cp_size * groups.tp_size if groups.cp_size > 1 else groups.tp_size
        etp = groups.expt_tp.size() if getattr(groups, "expt_tp", None) is not None else 1
        layout_reason = kv_cache_unsupported_reason(tp=groups.tp_size, cp=groups.cp_size, ep=groups.ep_size, etp=etp)
        # Why this engine recomputes the prefix (None: it uses the KV cache).
        self.recompute_reason = "kv_cache=False" if not cfg.kv_cache else layout_reason
        if cfg.kv_cache and layout_reason is not None:
            logger.warning("embedded engine: no KV cache for this layout (%s); recomputing the prefix every "
                           "token", layout_reason)
        # CUDA graphs of the decode steps (cuda_graphs): kept across generations; `graph_reason` says why the
        # last generation decoded eagerly (None: it replayed graphs, or cuda_graphs is off).
        self._graphs = DecodeGraphs(model, static_inference_context) if cfg.cuda_graphs else None
        self.graph_reason: str | None = None
        # torch.compile of the decode steps' forward (compile_decode); `compile_reason` says why it is off here.
        self.compile_reason = None if cfg.compile_decode else "compile_decode=False"
        if cfg.compile_decode:
            self.compile_reason = compile_unsupported_reason(
                model_parallel_size=groups.tp_size * groups.cp_size * groups.ep_size * groups.pp_size, fp8=cfg.fp8,
                router_noise=cfg.router_noise)
            if self.compile_reason is not None:
                logger.warning("embedded engine: decode steps not compiled (%s)", self.compile_reason)
        self._compiled = CompiledDecode(model) if self.compile_reason is None else None

    @property
    def uses_kv_cache(self) -> bool:
        return self.recompute_reason is None

    # ------------------------------------------------------------------ weights

    @property
    def weight_version(self) -> int:
        """The version of the weights the next generation uses."""
        return self._snapshots[0][0] if self._snapshots else self._version

    def sync_weights(self, weights: PolicyWeights, version: int) -> None:
        """The engine samples with the training model itself; with `lag` > 0 its weights are snapshotted
        (kept for `lag` more syncs)."""
        if self.cfg.lag > 0:
            state = {k: v.detach().clone() for k, v in weights.model.state_dict().items()
                     if isinstance(v, torch.Tensor)}
            self._snapshots.append((version, state))
        self._version = version

    def state(self) -> dict:
        return {"version": self._version, "snapshots": list(self._snapshots)}

    def load_state(self, state: dict, weights: PolicyWeights) -> None:
        self._version = state["version"]
        self._snapshots.clear()
        self._snapshots.extend(state["snapshots"])

    @contextlib.contextmanager
    def _engine_weights(self):
        if self.cfg.lag == 0 or not self._snapshots or self._snapshots[0][0] == self._version:
            yield
            return
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}
        self.model.load_state_dict(self._snapshots[0][1], strict=False)
        try:
            yield
        finally:
            self.model.load_state_dict(current, strict=False)

    # ------------------------------------------------------------------ forward

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run_forward(self, tokens: torch.Tensor, positions: torch.Tensor, context=None) -> torch.Tensor | None:
        """One forward through megatron's schedule (pipeline p2p included). Returns this rank's logits
        [B, s, V/tp] on the last pipeline stage (with a KV context: [B, 1, V], gathered), else None."""
        B, s = tokens.shape
        captured = {}
        # megatron's inference postprocess asserts the logits are gathered over TP (full vocabulary)
        extra = {} if context is None else {"inference_context": context, "runtime_gather_output": True}

        def autocast(device):
            # No cast cache: a CUDA graph must recast the weights in every replay (values are the same)
            return (torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
                    if self.cfg.precision == "bf16" else contextlib.nullcontext())

        if self.groups.pp_size == 1:
            # one stage: the model directly, as megatron's own inference engines call it (the schedule's
            # per-call bookkeeping is host time in every decode step, and there is nothing to send)
            with cpu_device_context(), autocast(tokens.device):
                if self._compiled is not None and context is not None and s == 1:  # a decode step
                    out = self._compiled(tokens, positions, context)
                else:
                    out = self.model(input_ids=tokens, position_ids=positions, attention_mask=None, **extra)
            return out.float()

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            with autocast(batch.device):
                out = model(input_ids=batch, position_ids=positions, attention_mask=None, **extra)

            def capture(output):
                captured["logits"] = output.float()
                return output.float().sum() * 0.0, torch.tensor(0, dtype=torch.int), {}

            return out, capture

        with cpu_device_context():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=[self.model],
                num_microbatches=1, seq_length=s, micro_batch_size=B, forward_only=True,
            )
        return captured["logits"] if self.groups.is_last_stage else None

    def _gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """[B, V/tp] -> [B, V] (TP all-gather), cut to the real vocabulary."""
        g = self.groups
        if g.tp_size > 1:
            shards = [torch.empty_like(local) for _ in range(g.tp_size)]
            dist.all_gather(shards, local.contiguous(), group=g.tp)
            local = torch.cat(shards, dim=-1)
        return local[:, : self.vocab_size]

    @torch.no_grad()
    def _recompute_logits(self, rows: torch.Tensor, last: int) -> torch.Tensor | None:
        """[B, V] fp32 logits at position `last` of every row, from a forward over rows[:, :last+1] (padded to
        the layout's multiple; CP zigzag split). None off the last pipeline stage."""
        g = self.groups
        B = rows.size(0)
        S = round_up(last + 1, max(self._pad_multiple, 1))
        index = zigzag_indices(S, g.cp_size, g.cp_rank) if g.cp_size > 1 else torch.arange(S)
        index = index.to(rows.device)
        tokens = rows[:, :S].index_select(1, index)
        local = self._run_forward(tokens, index.expand(B, -1).clone())
        if local is None:
            return None
        where = index == last  # [S/cp]: whether this rank holds position `last`
        out = local[:, where].sum(1) if bool(where.any()) else local[:, 0] * 0.0  # [B, V/tp]
        if g.cp_size > 1:
            dist.all_reduce(out, group=g.cp)
        return self._gather_vocab(out)

    def _broadcast_from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g.pp_size > 1:
            src = dist.get_global_rank(g.pp, g.pp_size - 1)
            buf = x.to(comm_device(g.pp))
            dist.broadcast(buf, src=src, group=g.pp)
            x = buf.to(x.device)
        return x

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest], *, seed: int = 0) -> list[Generation | SampleError]:
        if not requests:
            return []
        temps = {r.temperature for r in requests}
        if len(temps) != 1:
            raise ValueError(f"GenerationRequest.temperature: the embedded engine samples one temperature per call, got {sorted(temps)}")
        temperature = temps.pop()
        record = self.record_routing and any(r.return_routing for r in requests)
        unwrapped = unwrap_model(self.model)
        with self._engine_weights(), engine_mismatch(self.model, fp8=self.cfg.fp8,
                                                     router_noise=self.cfg.router_noise, seed=seed), \
                _decode_kernel(self.cfg.decode_attention):
            self.model.eval()
            try:
                if record:
                    RouterReplay.clear_global_indices()
                    RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
                if self.uses_kv_cache:
                    with sequence_parallel_off(self.model, unwrapped.config), \
                            dense_small_batches(self.model, self.cfg.dense_moe_rows):
                        rows, lengths, out_lp, n_new, routes = self._decode(requests, seed, temperature, True, record)
                else:
                    rows, lengths, out_lp, n_new, routes = self._decode(requests, seed, temperature, False, record)
                    if record:
                        routes = self._recompute_routing(rows, lengths)
            finally:
                if record:
                    RouterReplay.set_global_router_replay_action(None)
                    RouterReplay.clear_global_indices()
                self.model.train()
        version = self.weight_version
        # to Python lists once: per-row tensor slices cost a few microseconds each, for every row of every rollout
        rows, lengths, out_lp, n_new = rows.tolist(), lengths.tolist(), out_lp.tolist(), n_new.tolist()
        routes = routes.cpu() if record else None
        out = []
        for b, r in enumerate(requests):
            P, n = len(r.prompt_ids), n_new[b]
            ids = tuple(rows[b][P : P + n])
            out.append(Generation(
                sample_id=r.sample_id, prompt_ids=tuple(r.prompt_ids), output_ids=ids,
                output_logprobs=tuple(out_lp[b][:n]), weight_version=version,
                finish_reason="stop" if ids and ids[-1] == self.eos_id else "length",
                routing=self._routing_record(r, routes, b, lengths[b]) if record else None,
            ))
        return out

    @torch.no_grad()
    def _decode(self, requests, seed: int, temperature: float, cached: bool, record: bool):
        """The decode loop shared by both paths. Returns rows [B, S'], lengths [B], log-probs [B, N'], new-token
        counts [B] and (cached + record) the recorded routing [L, S', B, K] (else None); S' >= S, N' >= N."""
        device = self._device()
        B = len(requests)
        N = max(r.max_new_tokens for r in requests)
        p_min = min(len(r.prompt_ids) for r in requests)
        if p_min < 1:
            raise ValueError("GenerationRequest.prompt_ids: expected at least one token, got an empty prompt")
        S = max(len(r.prompt_ids) for r in requests) + N  # every position a row can fill
        start = DecodeState.new(requests, eos_id=self.eos_id, width=round_up(S, max(self._pad_multiple, 1)),
                                seed=seed, device=device)
        graphs = (self._graph_set(B, S, record, device, temperature=temperature, stop_width=start.stop.size(1))
                  if cached else None)
        if graphs is not None:  # the set's static buffers: what its graphs read and write
            state = graphs.state
            state.load_(start)
            context = graphs.context
        else:
            state = start
            context = static_inference_context(B, S) if cached else None

        def take(logits: torch.Tensor | None, pos: int) -> None:
            """Sample position `pos` of every row from its [B, V] logits (None off the last pipeline stage)."""
            state.advance(self._broadcast_from_last_stage(state.sample(logits, temperature)), pos)

        def step_at(first: int, pos: int) -> None:
            """Sample position `pos` of every row from a cached forward over positions [first, pos)."""
            local = self._run_forward(state.rows[:, first:pos], torch.arange(first, pos, device=device).expand(B, -1),
                                      context)
            if record:
                state.record(torch.stack([r.to(device) for r in RouterReplay.get_recorded_data()]), first, pos)
            take(None if local is None else local[:, -1, : self.vocab_size], pos)

        # on CPU reading the flag costs no sync: read each step's own
        lag = self.cfg.stop_read_lag if device.type == "cuda" else 0
        stop = StopReader(every=self.cfg.stop_check_every, lag=lag, last=S - 1, device=device)
        pos = p_min
        while True:
            if not cached:
                take(self._recompute_logits(state.rows, pos - 1), pos)
            else:
                first = 0 if context.sequence_len_offset == 0 else pos - 1  # the prefill, then one position a step
                if graphs is not None and first > 0:  # a decode step: replayed (captured the first time)
                    graphs.step(pos, lambda pos=pos: step_at(pos - 1, pos))
                else:
                    step_at(first, pos)
                context.increment_sequence_len_offset(pos - first)
                context.enable_decode_mode()
            # Every row has stopped by position S - 1 (its prompt plus its max_new_tokens): the loop ends there
            # at the latest; before, when the host's (late, non-blocking) read of "all stopped" says so.
            if stop.poll(pos, state.done):
                break
            pos += 1
        self._check_graph_capture(graphs)
        lengths = state.prompt_len + state.n_new
        return state.rows, lengths, state.out_lp, state.n_new, state.routes if record else None

    def _graph_set(self, rows: int, positions: int, record: bool, device: torch.device, **key):
        """The CUDA-graph set for this generation's shape, or None (graphs off, or the layout cannot capture
        its decode step: `graph_reason`, logged once per reason)."""
        if self._graphs is None:
            return None
        g = self.groups
        reason = graph_unsupported_reason(
            device=device, model_parallel_size=g.tp_size * g.cp_size * g.pp_size * g.ep_size,
            router_noise=self.cfg.router_noise, moe_reason=self._moe_dispatcher_reason(rows),
            uses_kv_cache=self.uses_kv_cache)
        if reason is not None and reason != self.graph_reason:
            # on by default: a CPU run is told once, quietly; anything else that rules graphs out is a warning
            log = logger.info if device.type != "cuda" else logger.warning
            log("embedded engine: decoding without CUDA graphs (%s)", reason)
        self.graph_reason = reason
        return None if reason is not None else self._graphs.get(rows, positions, record, device, **key)

    def _moe_dispatcher_reason(self, rows: int) -> str | None:
        """Why some MoE layer of the model would take megatron's dispatcher in a decode step of `rows` rows
        (None: every one takes the dispatcher-free path, `megatron.small_batch_moe`). Asked of the model itself,
        not of the engine's arguments."""
        for name, m in self.model.named_modules():
            if not isinstance(m, MoELayer):
                continue
            if not isinstance(m, SmallBatchMoELayer):
                return f"{name} is a {type(m).__name__}, without the dispatcher-free path"
            why = m.dense_path_reason(rows, self.cfg.dense_moe_rows)
            if why is not None:
                return f"{name}: {why}"
        return None

    def _check_graph_capture(self, graphs) -> None:
        """After a generation: a failed capture turns graphs off for this engine (the generation itself
        finished eagerly, with the same results), with a warning and the reason in `graph_reason`."""
        if graphs is not None and graphs.failed is not None:
            logger.warning("embedded engine: %s; decoding without CUDA graphs from now on", graphs.failed)
            self._graphs = None
            self.graph_reason = graphs.failed

    def _recompute_routing(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Recompute path: routing of every position from one more recorded forward over the final
        sequences (causal: the routing each token got when it was processed). [L, S, B, K]."""
        RouterReplay.clear_global_indices()
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        S = round_up(int(lengths.max()), max(self._pad_multiple, 1))
        B = rows.size(0)
        self._run_forward(rows[:, :S], torch.arange(S, device=rows.device).expand(B, -1).clone())
        step = torch.stack([r.to(rows.device) for r in RouterReplay.get_recorded_data()])  # [L, S*B, K]
        return step.reshape(step.size(0), S, B, -1)

    def _routing_record(self, req: GenerationRequest, routes: torch.Tensor, b: int, length: int) -> RoutingRecord:
        """Row b's routing of every token but the last (which no forward processed): [n, L_moe, K]."""
        n = length - 1
        ids = routes[:, :n, b].permute(1, 0, 2)
        return RoutingRecord(
            sample_id=req.sample_id, expert_ids=ids.numpy().astype(compact_dtype(self.num_experts)),
            num_prompt_tokens=len(req.prompt_ids), num_output_tokens=length - len(req.prompt_ids),
            moe_layers=self.moe_layers, num_experts=self.num_experts,
        )
