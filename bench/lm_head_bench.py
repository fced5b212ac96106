"""Benchmark: the RL loss head, bf16 hidden states -> LM head -> log-probs (+ entropy) -> VESPO loss, forward and
backward down to d hidden and d W. Not a test.

Shapes: H = 2048, V = 151936 (TP = 1) or a V/4 = 37984 shard (the per-rank work of TP = 4 on one device, without
the two [T]-sized all-reduces), T = B x S response tokens, B = 8 sequences. Variants:

* gemm_floor   hidden @ W.T forward, then the two backward GEMMs (d hidden, d W) for a random upstream
* logits       the logits path: the GEMM, then `vocab_parallel_logprobs` (Triton), then VESPO
* fused_<n>    `fused_lm_head_logprobs` with 2**n logits elements per tile, then VESPO
* single_<n>   `fused_lm_head_loss` (the single pass: VESPO per chunk of whole sequences inside the head, the
               gradients formed while each chunk's logits are alive, 3 GEMMs instead of 4), 2**n elements a chunk;
               `single_<n>_main_grad`: the weight carries megatron DDP's fp32 main_grad, where d W is added
               (timed with the main_grad.zero_() a step's zero_grad_buffer would do)
* liger        Liger-Kernel's `LigerFusedLinearGRPOLoss(loss_type="vespo", beta=0, use_ref_model=False)` (its own
               token-level VESPO; TP = 1 only; only if liger_kernel imports)

"extra" is the peak allocated during the call minus what was allocated before it (the inputs): it includes
the returned d hidden and d W. Every variant that runs the project's loss or head is timed as the training step
runs it (`megatron/step.py`): inside `checked_on_host(token_seq=True, targets=(lo, hi))` with the facts read
once on the host before timing, so the argument checks read no device value (a sync on CUDA, once per chunk
of the single pass). "host reads" counts the tensor values a call still reads on the host, "ops" the torch ops
it dispatches, views included (one extra call under a dispatch-mode counter, `update_op_count.OpCounter`). "fwd"
is the forward-only (no grad) log-prob pass: the old-log-prob pass. Correctness: every variant's loss and
gradients against the logits path at full size, and the fused head and the logits path against float64 on a
small T with the full vocab (entropy gradient included).

    python bench/lm_head_bench.py --out OUT [--tokens 16384,32768] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the package imports without megatron-core for these modules

from vespo_megatron.base.host_checks import checked_on_host  # noqa: E402
from vespo_megatron.losses import get_policy_loss  # noqa: E402
from vespo_megatron.parallel import fused_lm_head as flh  # noqa: E402
from vespo_megatron.parallel.fused_lm_head_loss import fused_lm_head_loss, plan_head_chunks  # noqa: E402
from vespo_megatron.parallel.sequence import build_loss_inputs, global_normalizer  # noqa: E402
from vespo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs  # noqa: E402

sys.path.insert(0, HERE)
from update_op_count import OpCounter  # noqa: E402

GIB = float(1 << 30)
H, V, B = 2048, 151936, 8
DEV = "cuda"  # --cpu-smoke: "cpu" with small shapes, to check the script itself


def cuda_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    if DEV == "cpu":
        import time

        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def extra_gib(fn) -> float:
    if DEV == "cpu":
        return float("nan")
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / GIB


def make_inputs(t: int, v: int, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    dev = DEV
    hidden = torch.randn(t, H, generator=g, device=dev).to(torch.bfloat16)
    weight = (torch.randn(v, H, generator=g, device=dev) * (2.0 / H**0.5)).to(torch.bfloat16)  # logits std ~2
    targets = torch.randint(0, v, (t,), generator=g, device=dev)
    return hidden, weight, targets


class Vespo:
    """The project's VESPO loss on per-token log-probs of B sequences of equal length."""

    def __init__(self, t: int, old_logp: torch.Tensor, seed: int = 1):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.loss = get_policy_loss("vespo")
        self.cfg = self.loss.default_config()
        self.mask = torch.ones(t, device=DEV)
        self.token_seq = torch.arange(B, device=DEV).repeat_interleave(t // B)
        self.adv = torch.randn(B, generator=g, device=DEV)
        self.old = old_logp
        self.norm = global_normalizer([self.mask], [self.token_seq], [B])
        self.seq_tokens = [t // B] * B

    @staticmethod
    def host_facts(targets) -> dict:
        """What the training step checks on its micro-batch's host copy (`step.host_facts`), read once here before
        timing: token_seq is in [0, B) by construction (and every chunk's shifted copy in its own range), the
        target ids' range is read from a host copy."""
        host = targets.cpu()
        return {"token_seq": True, "targets": (int(host.min()), int(host.max()))}

    def __call__(self, logp):
        inputs = build_loss_inputs(logp=logp, old_logp=self.old, mask=self.mask, token_seq=self.token_seq,
                                   num_seqs=B, advantages=self.adv,
                                   differentiable_seq_log_ratio=self.loss.seq_grad(self.cfg))
        return self.loss(inputs, self.norm, self.cfg).loss

    def chunk_loss(self, c):
        """The same loss on the whole sequences [c.seq_start, c.seq_end) (the single-pass head's chunks)."""
        tokens = slice(c.start, c.end)
        inputs = build_loss_inputs(logp=c.logprobs, old_logp=self.old[tokens], mask=self.mask[tokens],
                                   token_seq=self.token_seq[tokens] - c.seq_start, num_seqs=c.seq_end - c.seq_start,
                                   advantages=self.adv[c.seq_start:c.seq_end],
                                   differentiable_seq_log_ratio=self.loss.seq_grad(self.cfg))
        return self.loss(inputs, self.norm, self.cfg).loss


def host_checked(fn, facts: dict):
    """`fn` run inside `checked_on_host(**facts)`, as the training step runs its loss path (module docstring)."""
    if fn is None:
        return None

    def run():
        with checked_on_host(**facts):
            return fn()

    return run


def profile_to(fn, path: str) -> None:
    """torch.profiler over two calls of `fn` (after the timing's warm-up): where a variant's time goes, by op."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            fn()
        if DEV == "cuda":
            torch.cuda.synchronize()
    table = prof.key_averages()
    text = []
    if DEV == "cuda":
        text += ["# by device time (2 calls)", table.table(sort_by="device_time_total", row_limit=30)]
    text += ["# by host time (2 calls)", table.table(sort_by="cpu_time_total", row_limit=30)]
    with open(path, "w") as f:
        f.write("\n".join(text) + "\n")


def host_reads(fn) -> tuple[int, int]:
    """(tensor values one call of `fn` reads on the host (`.item()`, `int(t)`: each a device sync on CUDA), torch
    ops it dispatches (views included): what a launch-bound call's host time goes with)."""
    counter = OpCounter()
    with counter:
        fn()
    return sum(counter.syncs.values()), sum(counter.by_source.values())


def variants(hidden, weight, targets, vespo: Vespo, chunk_exps, with_liger: bool, single_exps=()):
    """{name: (forward-only fn or None, forward + backward fn)}; those running the project's loss or head are
    wrapped in `checked_on_host` with the facts read once on the host (the training step's way)."""
    facts = Vespo.host_facts(targets)
    out = _variants(hidden, weight, targets, vespo, chunk_exps, with_liger, single_exps)
    return {name: fns if name in ("gemm_floor", "liger") else tuple(host_checked(f, facts) for f in fns)
            for name, fns in out.items()}


def _variants(hidden, weight, targets, vespo: Vespo, chunk_exps, with_liger: bool, single_exps=()):
    h_leaf, w_leaf = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    out = {}

    def floor_fwd():
        with torch.no_grad():
            return hidden @ weight.t()

    upstream = torch.randn(targets.numel(), weight.shape[0], device=DEV, dtype=torch.bfloat16)  # random, not 0

    def floor_bwd():
        logits = h_leaf @ w_leaf.t()
        return torch.autograd.grad(logits, (h_leaf, w_leaf), grad_outputs=upstream)

    out["gemm_floor"] = (floor_fwd, floor_bwd)

    def logits_fwd():
        with torch.no_grad():
            lp = vocab_parallel_logprobs(hidden @ weight.t(), targets, compute_entropy=True)
            return lp.logprobs, lp.entropy

    def logits_bwd():
        lp = vocab_parallel_logprobs(h_leaf @ w_leaf.t(), targets, compute_entropy=True)
        loss = vespo(lp.logprobs)
        return (loss.detach(), *torch.autograd.grad(loss, (h_leaf, w_leaf)))

    out["logits"] = (logits_fwd, logits_bwd)

    logp_leaf = vespo.old.detach().clone().requires_grad_()

    def vespo_only():  # the loss alone on given log-probs: the part of every variant that is not the head
        loss = vespo(logp_leaf)
        return (loss.detach(), *torch.autograd.grad(loss, logp_leaf))

    out["vespo_only"] = (None, vespo_only)

    def fused_noent():
        lp = flh.fused_lm_head_logprobs(h_leaf, w_leaf, targets, compute_entropy=False)
        loss = vespo(lp.logprobs)
        return (loss.detach(), *torch.autograd.grad(loss, (h_leaf, w_leaf)))

    out["fused_29_no_entropy"] = (None, fused_noent)

    for n in chunk_exps:
        def fused_fwd(n=n):
            with torch.no_grad():
                lp = flh.fused_lm_head_logprobs(hidden, weight, targets, compute_entropy=True, chunk_elements=int(2**n))
                return lp.logprobs, lp.entropy

        def fused_bwd(n=n):
            lp = flh.fused_lm_head_logprobs(h_leaf, w_leaf, targets, compute_entropy=True, chunk_elements=int(2**n))
            loss = vespo(lp.logprobs)
            return (loss.detach(), *torch.autograd.grad(loss, (h_leaf, w_leaf)))

        out[f"fused_{n}"] = (fused_fwd, fused_bwd)

    w_main = None
    for n in single_exps:
        def single_bwd(n=n):
            res = fused_lm_head_loss(h_leaf, w_leaf, targets, vespo.chunk_loss, seq_tokens=vespo.seq_tokens,
                                     compute_entropy=True, chunk_elements=int(2**n))
            return (res.loss.detach(), *torch.autograd.grad(res.loss, (h_leaf, w_leaf)))

        if w_main is None:  # a parameter as megatron's DDP leaves it: fp32 main_grad, grad_added_to_main_grad
            w_main = torch.nn.Parameter(weight.detach().clone())
            w_main.main_grad = torch.zeros(w_main.shape, dtype=torch.float32, device=DEV)
            w_main.grad_added_to_main_grad = False

        def single_main_grad_bwd(n=n, w_main=w_main):
            w_main.main_grad.zero_()
            w_main.grad_added_to_main_grad = False
            res = fused_lm_head_loss(h_leaf, w_main, targets, vespo.chunk_loss, seq_tokens=vespo.seq_tokens,
                                     compute_entropy=True, chunk_elements=int(2**n))
            res.loss.backward()  # as megatron's schedule: d W lands in main_grad, autograd gets a dummy
            dh, h_leaf.grad = h_leaf.grad, None
            w_main.grad = None  # the dummy megatron's hook would drop
            return res.loss.detach(), dh, w_main.main_grad

        out[f"single_{n}"] = (None, single_bwd)
        out[f"single_{n}_main_grad"] = (None, single_main_grad_bwd)

    if with_liger:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        t = targets.numel()
        torch._dynamo.reset()  # a second shape in one process broke dynamo's guards (torch 2.11)
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="vespo", temperature=1.0)
        ones = torch.ones(B, t // B, device=DEV)

        def liger_bwd():
            loss, _ = liger(h_leaf.view(B, t // B, H), w_leaf, targets.view(B, t // B), ones, vespo.adv,
                            old_per_token_logps=vespo.old.view(B, t // B))
            return (loss.detach(), *torch.autograd.grad(loss, (h_leaf, w_leaf)))

        out["liger"] = (None, liger_bwd)
    return out


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def small_float64_check(v: int, t: int) -> dict:
    """T = 256 tokens, full vocab: fused head and logits path (bf16) against float64 on the same bf16 values,
    entropy gradient included, temperature 0.8; several tiles (2**20 elements)."""
    hidden, weight, targets = make_inputs(t, v, seed=5)
    g = torch.Generator(device=DEV).manual_seed(6)
    glp, gh = torch.randn(t, generator=g, device=DEV), torch.randn(t, generator=g, device=DEV)
    x, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp = torch.log_softmax((x @ w.t()) / 0.8, -1)
    ref_lp = logp.gather(-1, targets[:, None]).squeeze(-1)
    ref_h = -(logp.exp() * logp).sum(-1)
    ref_dx, ref_dw = torch.autograd.grad((ref_lp * glp).sum() + (ref_h * gh).sum(), (x, w))
    res = {}
    for name in ("fused", "logits"):
        hl, wl = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if name == "fused":
            lp = flh.fused_lm_head_logprobs(hl, wl, targets, temperature=0.8, compute_entropy=True, chunk_elements=(1 << 20) if DEV == "cuda" else 5000)
        else:
            lp = vocab_parallel_logprobs(hl @ wl.t(), targets, temperature=0.8, compute_entropy=True)
        dx, dw = torch.autograd.grad((lp.logprobs * glp).sum() + (lp.entropy * gh).sum(), (hl, wl))
        res[name] = dict(logp_max_abs=float((lp.logprobs.double() - ref_lp).abs().max()),
                         entropy_max_abs=float((lp.entropy.double() - ref_h).abs().max()),
                         d_hidden_rel=rel(dx.double(), ref_dx), d_weight_rel=rel(dw.double(), ref_dw),
                         d_hidden_max_rel=max_rel(dx.double(), ref_dx), d_weight_max_rel=max_rel(dw.double(), ref_dw))
    return res


def _exponents(text: str) -> list:
    """'29,29.25' -> [29, 29.25]: log2 chunk sizes, ints where written so (the variants' names keep their form)."""
    return [float(x) if "." in x else int(x) for x in text.split(",") if x]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="16384,32768")
    ap.add_argument("--chunks", default="28,29,30", help="log2 of the fused head's tile sizes to measure")
    ap.add_argument("--single-chunks", default="29,30",
                    help="log2 of the single-pass head's chunk sizes to measure, fractions allowed ('' for none; "
                         "29.25: two 2048-token sequences of the full vocabulary per chunk)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--flat-tokens", default="8192,65536,131072",
                    help="extra token counts at which only the fused head's memory is measured (TP = 1)")
    ap.add_argument("--flat-chunk", default="29.25",
                    help="log2 of the tile / chunk size of the memory-against-T table (default: the single pass's "
                         "default chunk, 2**29.25)")
    ap.add_argument("--profile", default="",
                    help="comma-separated variants (e.g. logits,single_30) whose fwd+bwd torch.profiler table (top ops "
                         "by device time, then by host time) is written to OUT/profile_<shard>_<tokens>_<variant>.txt")
    ap.add_argument("--quick", action="store_true", help="T=2048 only, 2 repeats (a smoke run)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = ap.parse_args()
    if args.cpu_smoke:
        global H, V, DEV
        H, V, DEV = 64, 1024, "cpu"
        args.quick = True
        args.flat_tokens = "512"
        # 2**13 elements = 8 tokens of V = 1024: the smoke's sequences (32, 64 tokens) are over the single pass's
        # chunk budget, so its recomputing path for over-long sequences runs too
        args.flat_chunk = "13"
        args.single_chunks = "13,13.5,29"  # (a fractional exponent too)
    os.makedirs(args.out, exist_ok=True)
    tokens = [256 if args.cpu_smoke else 2048] if args.quick else [int(x) for x in args.tokens.split(",")]
    repeats = 2 if args.quick else args.repeats
    chunk_exps, single_exps = _exponents(args.chunks), _exponents(args.single_chunks)
    profiled = {x for x in args.profile.split(",") if x}
    try:
        import liger_kernel  # noqa: F401

        have_liger = True
    except ImportError:
        have_liger = False
    triton_version = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        pass
    env = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", torch=torch.__version__,
               triton=triton_version,
               liger=have_liger, H=H, V=V, B=B, repeats=repeats, command=" ".join(sys.argv))
    print(json.dumps(env), flush=True)
    small = small_float64_check(V, 64 if args.cpu_smoke else 256)
    print("float64 check (T=256, full V):", json.dumps(small), flush=True)
    rows, agreement = [], {}
    for v_shard, shard in ((V, "tp1"), (V // 4, "v/4")):
        for t in tokens:
            hidden, weight, targets = make_inputs(t, v_shard)
            with torch.no_grad():
                old = vocab_parallel_logprobs(hidden @ weight.t(), targets).logprobs
            old = old + 0.05 * torch.randn(old.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(2))
            vespo = Vespo(t, old)
            var = variants(hidden, weight, targets, vespo, chunk_exps, have_liger and shard == "tp1", single_exps)
            results = {}
            for name, (fwd, bwd) in var.items():
                slow = name == "liger"
                row = dict(shard=shard, V_shard=v_shard, tokens=t, variant=name)
                try:
                    row["fwd_bwd_ms"] = cuda_ms(bwd, 1 if slow else 2, 3 if slow else repeats)
                    row["fwd_bwd_extra_gib"] = extra_gib(bwd)
                    if fwd is not None:
                        row["fwd_ms"] = cuda_ms(fwd, 2, repeats)
                        row["fwd_extra_gib"] = extra_gib(fwd)
                    if name != "liger":  # (dispatch mode under torch.compile: not tried)
                        row["host_reads"], row["ops"] = host_reads(bwd)
                    if name not in ("gemm_floor", "vespo_only"):
                        results[name] = bwd()
                    if name in profiled:
                        profile_to(bwd, os.path.join(args.out, f"profile_{shard.replace('/', '')}_{t}_{name}.txt"))
                except Exception as exc:  # noqa: BLE001 - a failing variant is recorded, the rest still run
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                rows.append(row)
                print(json.dumps(row), flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            ref = results.pop("logits", None)
            if ref is not None:
                for name, (loss, dh, dw) in results.items():
                    agreement[f"{shard}/{t}/{name}"] = dict(
                        loss_rel=abs(float(loss) - float(ref[0])) / max(abs(float(ref[0])), 1e-30),
                        d_hidden_rel=rel(dh, ref[1]), d_weight_rel=rel(dw, ref[2]),
                        d_hidden_max_rel=max_rel(dh, ref[1]), d_weight_max_rel=max_rel(dw, ref[2]))
                    print(name, json.dumps(agreement[f"{shard}/{t}/{name}"]), flush=True)
            del hidden, weight, targets, vespo, var, results, ref
            gc.collect()
            torch.cuda.empty_cache()
    flat = []  # memory against T, fused head and single pass (2**flat_chunk elements), TP = 1
    (n,) = _exponents(args.flat_chunk)
    for t in [int(x) for x in args.flat_tokens.split(",") if x]:
        hidden, weight, targets = make_inputs(t, V)
        old = torch.full((t,), -12.0, device=DEV)
        vespo = Vespo(t, old)
        var = variants(hidden, weight, targets, vespo, [n], False, [n])
        # sequences too long to be held whole (over twice the single pass's chunk): the recomputing head's tiles
        over = sum(plan_head_chunks(vespo.seq_tokens, V, int(2**n))[1])
        for name in (f"fused_{n}", f"single_{n}"):
            fwd, bwd = var[name]
            row = dict(variant=name, tokens=t, seq_tokens=t // B, seqs_over_budget=over if "single" in name else None,
                       fwd_bwd_ms=cuda_ms(bwd, 1, 3), fwd_bwd_extra_gib=extra_gib(bwd),
                       fwd_extra_gib=None if fwd is None else extra_gib(fwd),
                       inputs_gib=(hidden.numel() * 2 + weight.numel() * 2) / GIB,
                       d_hidden_gib=hidden.numel() * 2 / GIB, d_weight_gib=weight.numel() * 2 / GIB)
            flat.append(row)
            print("flat", json.dumps(row), flush=True)
        del hidden, weight, targets, vespo, var, fwd, bwd
        gc.collect()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    floor = {(r["shard"], r["tokens"]): r.get("fwd_bwd_ms") for r in rows if r["variant"] == "gemm_floor"}
    for r in rows:
        f = floor.get((r["shard"], r["tokens"]))
        if f and r.get("fwd_bwd_ms"):
            r["over_floor"] = r["fwd_bwd_ms"] / f
    result = dict(env=env, accumulate_path=flh.ACCUMULATE_PATH, float64_check=small, agreement=agreement, rows=rows,
                  flat=flat)
    # named by the card (lm_head_h100.md, lm_head_h200.md, lm_head_cpu.md): numbers of two cards never share a file
    stem = "lm_head_" + card_tag(env["device"])
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump(result, fh, indent=1)
    md = render(result)
    with open(os.path.join(args.out, stem + ".md"), "w") as fh:
        fh.write(md)
    print(md)


def card_tag(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', 'cpu' -> 'cpu'; other cards: their name's first word
    with a digit, lowercased."""
    words = [w.lower() for w in device_name.replace("-", " ").split()]
    return next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "unknown")


def render(res) -> str:
    def f(x, fmt="{:.1f}"):
        return "-" if x is None else fmt.format(x)

    env = res["env"]
    lines = [f"# RL loss head (LM head + log-probs + entropy + VESPO): {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, H={env['H']}, V={env['V']}, B={env['B']}, median of "
             f"{env['repeats']} (liger: 3); fp32 accumulation path: {res['accumulate_path']}; "
             f"command: `{env['command']}`", "",
             "| shard | tokens | variant | fwd+bwd ms | / GEMM floor | fwd+bwd extra GiB | fwd (old-logp) ms "
             "| fwd extra GiB | fwd+bwd host reads | fwd+bwd ops |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        name = r["variant"] + (f" ({r['error'][:60]})" if "error" in r else "")
        lines.append(f"| {r['shard']} (V={r['V_shard']}) | {r['tokens']} | {name} | {f(r.get('fwd_bwd_ms'))} "
                     f"| {f(r.get('over_floor'), '{:.3f}')} | {f(r.get('fwd_bwd_extra_gib'), '{:.2f}')} "
                     f"| {f(r.get('fwd_ms'))} | {f(r.get('fwd_extra_gib'), '{:.2f}')} "
                     f"| {f(r.get('host_reads'), '{:d}')} | {f(r.get('ops'), '{:d}')} |")
    lines += ["", "Fused head and single pass (2**n elements a tile / chunk: the variant's suffix), TP = 1, memory "
              "against T (the outputs d hidden and d W are part of 'extra'; 'over budget': sequences of more than twice "
              "the single pass's chunk, which go through the recomputing head's tiles):", "",
              "| variant | tokens | tokens / seq | over budget | fwd+bwd ms | fwd+bwd extra GiB "
              "| of which d hidden + d W GiB | fwd extra GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["flat"]:
        lines.append(f"| {r.get('variant', 'fused_29')} | {r['tokens']} | {f(r.get('seq_tokens'), '{:d}')} "
                     f"| {f(r.get('seqs_over_budget'), '{:d}')} | {f(r['fwd_bwd_ms'])} "
                     f"| {f(r['fwd_bwd_extra_gib'], '{:.2f}')} | {f(r['d_hidden_gib'] + r['d_weight_gib'], '{:.2f}')} "
                     f"| {f(r['fwd_extra_gib'], '{:.2f}')} |")
    lines += ["", "Agreement with the logits path at full size (relative L2 and max-abs / max-abs of the logits "
              "path's gradients):", "", "```", json.dumps(res["agreement"], indent=1), "```", "",
              "float64 reference, T=256, full vocab, temperature 0.8, entropy gradient included:", "", "```",
              json.dumps(res["float64_check"], indent=1), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
