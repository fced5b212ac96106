"""The embedded rollout engine: the policy's own megatron model sampling in inference mode, same processes.

Used by default (no server). Each data-parallel rank generates for its own requests; every rank of one
model-parallel group (TP / CP / EP / PP) calls `generate` with the same requests and the same `seed`, runs
the model forward through megatron's schedule (forward only, pipeline p2p included) and gets the same
tokens. Decoding recomputes the whole prefix every token (no KV cache): fine for short toy answers, not a
production server (that is SGLang's job).

A real train/inference mismatch can be switched on: `precision="bf16"` runs the engine's forward under bf16
autocast while the trainer stays in fp32. `lag` > 0 samples with the weights of `lag` syncs ago (fully
asynchronous training, emulated deterministically): every generation carries the weight version that made it.

Shape legend: [B] requests, [B, S] padded token rows (right padding), [B, V] last-position logits.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vespo_megatron.base.validation import check_choice, check_int
from vespo_megatron.compat import RouterReplay, RouterReplayAction, get_forward_backward_func
from vespo_megatron.megatron.cpu_shim import cpu_device_context
from vespo_megatron.parallel.cp_split import round_up, zigzag_indices
from vespo_megatron.parallel.sequence import comm_device
from vespo_megatron.routing import RoutingRecord
from vespo_megatron.routing.record import compact_dtype

from .engine import Generation, GenerationRequest, PolicyWeights, SampleError

__all__ = ["EmbeddedEngineConfig", "EmbeddedEngine"]


@dataclass(frozen=True, kw_only=True)
class EmbeddedEngineConfig:
    """precision: fp32 | bf16 (the engine's forward under bf16 autocast while the trainer stays in fp32: a
    real train/inference mismatch). lag: sample with the weights of `lag` syncs ago (asynchronous RL)."""

    precision: str = "fp32"
    lag: int = 0

    def __post_init__(self) -> None:
        check_choice("EmbeddedEngineConfig", "precision", self.precision, ("fp32", "bf16"))
        check_int("EmbeddedEngineConfig", "lag", self.lag, low=0, high=64)


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

    # ------------------------------------------------------------------ decoding

    @torch.no_grad()
    def _last_logits(self, rows: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """[B, V] fp32 logits at each row's last real position (None off the last pipeline stage)."""
        g = self.groups
        B, S = rows.shape
        device = next(self.model.parameters()).device
        index = zigzag_indices(S, g.cp_size, g.cp_rank) if g.cp_size > 1 else torch.arange(S)
        tokens = rows.index_select(1, index).to(device)
        positions = index.expand(B, -1).clone().to(device)
        index, lengths = index.to(device), lengths.to(device)
        captured = {}

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            autocast = (torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16)
                        if self.cfg.precision == "bf16" else contextlib.nullcontext())
            with autocast:
                out = model(input_ids=batch, position_ids=positions, attention_mask=None)

            def capture(output):
                captured["logits"] = output.float()
                return output.float().sum() * 0.0, torch.tensor(0, dtype=torch.int), {}

            return out, capture

        with cpu_device_context():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([tokens]), model=[self.model],
                num_microbatches=1, seq_length=S, micro_batch_size=B, forward_only=True,
            )
        if not g.is_last_stage:
            return None
        local = captured["logits"]  # [B, S/cp, V/tp]
        where = (index[None, :] == (lengths - 1)[:, None])  # [B, S/cp]: this rank holds row b's last position
        last = (local * where[..., None]).sum(1)  # [B, V/tp]
        if g.cp_size > 1:
            dist.all_reduce(last, group=g.cp)
        if g.tp_size > 1:
            shards = [torch.empty_like(last) for _ in range(g.tp_size)]
            dist.all_gather(shards, last.contiguous(), group=g.tp)
            last = torch.cat(shards, dim=-1)
        return last[:, : self.vocab_size].cpu()

    def _broadcast_from_last_stage(self, x: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g.pp_size > 1:
            src = dist.get_global_rank(g.pp, g.pp_size - 1)
            buf = x.to(comm_device(g.pp))
            dist.broadcast(buf, src=src, group=g.pp)
            x = buf.cpu()
        return x

    def generate(self, requests: list[GenerationRequest], *, seed: int = 0) -> list[Generation | SampleError]:
        if not requests:
            return []
        temps = {r.temperature for r in requests}
        if len(temps) != 1:
            raise ValueError(f"GenerationRequest.temperature: the embedded engine samples one temperature per call, got {sorted(temps)}")
        temperature = temps.pop()
        gen = torch.Generator().manual_seed(seed)
        B = len(requests)
        max_new = max(r.max_new_tokens for r in requests)
        prompt_len = torch.tensor([len(r.prompt_ids) for r in requests])
        S = round_up(int(prompt_len.max()) + max_new, max(self._pad_multiple, 1))
        rows = torch.zeros(B, S, dtype=torch.long)
        for b, r in enumerate(requests):
            rows[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        lengths = prompt_len.clone()
        done = torch.zeros(B, dtype=torch.bool)
        out_ids = [[] for _ in range(B)]
        out_lp = [[] for _ in range(B)]
        record = self.record_routing and any(r.return_routing for r in requests)
        with self._engine_weights():
            self.model.eval()
            try:
                for _ in range(max_new):
                    logits = self._last_logits(rows, lengths)
                    step = torch.zeros(B, 2, dtype=torch.float64)  # (token, logprob)
                    if logits is not None:
                        logp = torch.log_softmax(logits / temperature, dim=-1)
                        tok = torch.multinomial(logp.exp(), 1, generator=gen).squeeze(1)
                        step[:, 0] = tok.double()
                        step[:, 1] = logp.gather(1, tok[:, None]).squeeze(1).double()
                    else:
                        torch.rand(B, generator=gen)  # keep generators in step across stages
                    step = self._broadcast_from_last_stage(step)
                    for b in range(B):
                        if done[b]:
                            continue
                        t = int(step[b, 0])
                        out_ids[b].append(t)
                        out_lp[b].append(float(step[b, 1]))
                        rows[b, lengths[b]] = t
                        lengths[b] += 1
                        if t == self.eos_id or t in requests[b].stop_token_ids or len(out_ids[b]) >= requests[b].max_new_tokens:
                            done[b] = True
                    if bool(done.all()):
                        break
                routing = self._recorded_routing(requests, rows, lengths, S) if record else [None] * B
            finally:
                if record:
                    RouterReplay.set_global_router_replay_action(None)
                    RouterReplay.clear_global_indices()
                self.model.train()
        version = self.weight_version
        return [
            Generation(sample_id=r.sample_id, prompt_ids=tuple(r.prompt_ids), output_ids=tuple(out_ids[b]),
                       output_logprobs=tuple(out_lp[b]), weight_version=version,
                       finish_reason="stop" if out_ids[b] and out_ids[b][-1] == self.eos_id else "length",
                       routing=routing[b])
            for b, r in enumerate(requests)
        ]

    def _recorded_routing(self, requests, rows, lengths, S) -> list[RoutingRecord | None]:
        """Routing of every token but the last, from one more recorded forward over the final sequences
        (causal: the same routing each token got when it was first processed)."""
        RouterReplay.clear_global_indices()
        RouterReplay.set_global_router_replay_action(RouterReplayAction.RECORD)
        self._last_logits(rows, lengths.clamp(min=1))
        recorded = [r.cpu() for r in RouterReplay.get_recorded_data()]  # per MoE layer [B*S, K], s-major
        B = rows.size(0)
        per_layer = [r.reshape(S, B, -1).transpose(0, 1) for r in recorded]  # [B, S, K] each
        out = []
        for b, req in enumerate(requests):
            n = int(lengths[b]) - 1
            ids = torch.stack([layer[b, :n] for layer in per_layer], dim=1)  # [n, L_moe, K]
            out.append(RoutingRecord(
                sample_id=req.sample_id, expert_ids=ids.numpy().astype(compact_dtype(self.num_experts)),
                num_prompt_tokens=len(req.prompt_ids), num_output_tokens=int(lengths[b]) - len(req.prompt_ids),
                moe_layers=self.moe_layers, num_experts=self.num_experts,
            ))
        return out
