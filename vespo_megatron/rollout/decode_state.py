"""The embedded engine's decode-loop state and its per-step sampler, shared by the eager loop and the CUDA graphs.

Why a state object: a replayed CUDA graph can only read and write tensors that live at fixed addresses. The
decode step (forward, sample, write the token and its log-prob, count, mark stopped rows) therefore works on
the tensors of a `DecodeState`: the eager loop builds one per generation (`DecodeState.new`); a graph set keeps
one of its own, sized for its batch shape, and loads each generation into it (`load_`), so the captured step
is the eager step, kernel for kernel, and makes the same tokens.

Sampling: row b's k-th new token is the inverse-CDF draw of the uniform u[b, k] pre-drawn from the
generation's seed (`kv_cache.inverse_cdf_sample`); rows inside their prompt keep their prompt token; a row
stops at a stop id or at its max_new_tokens and then rides along unchanged (its token and log-prob slots are
not written), so running more steps than needed changes nothing.

`StopReader` is the host's view of "have all rows stopped?": read every `every` steps and, on CUDA, `lag`
steps late from a pinned copy made without blocking, so the host keeps queueing steps while the device runs
them (up to `lag` steps run after the last row stopped: they change nothing, as above).

Shape legend: [B] rows, [B, S] token rows (right padding), [B, N] per new token (the uniforms, the log-probs),
[B, W] each row's stop ids (padded by repeating the first), [B, V] logits of one position, [L, S, B, K] recorded
top-k experts per MoE layer and position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_cache import inverse_cdf_sample

__all__ = ["DecodeState", "StopReader"]


@dataclass
class DecodeState:
    rows: torch.Tensor  # [B, S] long: prompts, then the sampled tokens
    u: torch.Tensor  # [B, N] float64: row b's uniform for its k-th new token
    out_lp: torch.Tensor  # [B, N] float64: the sampled tokens' log-probs
    n_new: torch.Tensor  # [B] long: new tokens so far
    done: torch.Tensor  # [B] bool: stopped
    prompt_len: torch.Tensor  # [B] long
    max_new: torch.Tensor  # [B] long
    stop: torch.Tensor  # [B, W] long
    routes: torch.Tensor | None = None  # [L, S, B, K]: the routing each position got (R3), allocated by `record`

    @classmethod
    def new(cls, requests, *, eos_id: int, width: int, seed: int, device: torch.device) -> DecodeState:
        """The start of a generation of `requests`: rows [B, width] holding the prompts, u from `seed`."""
        B = len(requests)
        N = max(r.max_new_tokens for r in requests)
        rows = torch.zeros(B, width, dtype=torch.long)
        for b, r in enumerate(requests):
            rows[b, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        stops = [(eos_id, *r.stop_token_ids) for r in requests]
        w = max(len(x) for x in stops)
        return cls(
            rows=rows.to(device),  # one copy, not one per row
            u=torch.rand(B, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device),
            out_lp=torch.zeros(B, N, dtype=torch.float64, device=device),
            n_new=torch.zeros(B, dtype=torch.long, device=device),
            done=torch.zeros(B, dtype=torch.bool, device=device),
            prompt_len=torch.tensor([len(r.prompt_ids) for r in requests], device=device),
            max_new=torch.tensor([r.max_new_tokens for r in requests], device=device),
            stop=torch.tensor([x + (x[0],) * (w - len(x)) for x in stops], device=device),
        )

    @classmethod
    def buffers(cls, rows: int, positions: int, stop_width: int, device: torch.device) -> DecodeState:
        """Static buffers for any generation of `rows` rows, up to `positions` positions and `stop_width` stop ids
        (a graph set's state; `load_` fills it)."""
        def z(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(rows=z(rows, positions), u=z(rows, positions, dtype=torch.float64),
                   out_lp=z(rows, positions, dtype=torch.float64), n_new=z(rows), done=z(rows, dtype=torch.bool),
                   prompt_len=z(rows), max_new=z(rows), stop=z(rows, stop_width))

    def load_(self, start: DecodeState) -> None:
        """Copy the start of a generation into these (larger or equal) buffers; the rest is zeroed. The uniforms
        past a generation's N are never used: a row samples only while n_new < max_new <= N."""
        for name in ("rows", "u", "out_lp"):
            dst, src = getattr(self, name), getattr(start, name)
            if src.size(0) != dst.size(0) or src.size(1) > dst.size(1):
                raise ValueError(f"DecodeState.{name}: expected at most {tuple(dst.shape)}, got {tuple(src.shape)}")
            dst.zero_()
            dst[:, : src.size(1)].copy_(src)
        for name in ("n_new", "done", "prompt_len", "max_new", "stop"):
            dst, src = getattr(self, name), getattr(start, name)
            if src.shape != dst.shape:
                raise ValueError(f"DecodeState.{name}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)}")
            dst.copy_(src)

    def sample(self, logits: torch.Tensor | None, temperature: float) -> torch.Tensor:
        """[B, 2] float64 (token, log-prob) drawn from [B, V] logits; zeros where this rank has no logits (a
        pipeline stage before the last: the engine broadcasts the last stage's)."""
        B = self.n_new.size(0)
        step = torch.zeros(B, 2, dtype=torch.float64, device=self.n_new.device)
        if logits is not None:
            logp = torch.log_softmax(logits.float() / temperature, dim=-1)
            tok = inverse_cdf_sample(logp, self.u.gather(1, self.n_new.clamp(max=self.u.size(1) - 1)[:, None])[:, 0])
            step[:, 0] = tok.double()
            step[:, 1] = logp.gather(1, tok[:, None]).squeeze(1).double()
        return step

    def advance(self, step: torch.Tensor, pos: int) -> None:
        """Write the [B, 2] (token, log-prob) `step` at position `pos` of the rows still sampling there."""
        tok = step[:, 0].long()
        sampling = ~self.done & (pos >= self.prompt_len)  # rows whose position `pos` is a new token
        self.rows[:, pos] = torch.where(sampling, tok, self.rows[:, pos])  # rows inside their prompt keep it
        slot = self.n_new.clamp(max=self.out_lp.size(1) - 1)[:, None]
        self.out_lp.scatter_(1, slot, torch.where(sampling, step[:, 1], self.out_lp.gather(1, slot)[:, 0])[:, None])
        self.n_new += sampling.long()
        hit = (tok[:, None] == self.stop).any(dim=1)
        self.done |= sampling & (hit | (self.n_new >= self.max_new))

    def record(self, step_routes: torch.Tensor, start: int, pos: int) -> None:
        """Keep the [L, (pos - start) * B, K] routing (s-major) of the forward over positions [start, pos)."""
        L, K = step_routes.size(0), step_routes.size(-1)
        B, S = self.rows.shape
        if self.routes is None:
            self.routes = torch.zeros(L, S, B, K, dtype=step_routes.dtype, device=self.rows.device)
        self.routes[:, start:pos] = step_routes.reshape(L, pos - start, B, K)


class StopReader:
    """The host's read of `done.all()`: `poll(pos, done)` after each step returns True once the flag it reads is
    set. It reads every `every` steps (and stops at `last` without reading: every row has stopped by then); the
    flag read is the one of `lag` steps before (0: this step's). On CUDA the flags are copied to pinned host
    memory without blocking, so with a lag the host waits only for a step `lag` steps back and keeps the
    device's queue full."""

    def __init__(self, *, every: int, lag: int, last: int, device: torch.device):
        self.every, self.lag, self.last = every, lag, last
        self._cuda = device.type == "cuda"
        # a ring of lag + 1 slots: slot i % (lag + 1) is written at step i and read at step i + lag
        self._flags = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=self._cuda)
        self._events = [torch.cuda.Event() for _ in range(lag + 1)] if self._cuda and lag else None
        self._steps = 0

    def poll(self, pos: int, done: torch.Tensor) -> bool:
        i = self._steps
        self._steps += 1
        if pos >= self.last:
            return True
        if self.lag == 0:
            return self._steps % self.every == 0 and bool(done.all())
        slot = i % (self.lag + 1)
        self._flags[slot].copy_(done.all(), non_blocking=self._cuda)
        if self._events is not None:
            self._events[slot].record()
        if i < self.lag or self._steps % self.every != 0:
            return False
        old = (i - self.lag) % (self.lag + 1)  # the flag of `lag` steps ago
        if self._events is not None:
            self._events[old].synchronize()
        return bool(self._flags[old])
