"""GPU check: is the old-log-prob pass of a single-pass run bitwise its training pass (pi / pi_old exactly 1)?

bf16 hidden [T, H] and W [V/tp, H] (H = 2048, V = 151936 and a V/4 shard), T = 16384 tokens in sequences of
several length mixes (8 x 2048; random 100-4000 tokens, fixed seed; one 8192-token sequence, over twice the chunk,
through the recomputing tiles, and 4 x 2048). Log-probs from
  (a) `fused_lm_head_logprobs` under no_grad: the recomputing head's token tiles (the old-log-prob pass before),
  (b) `fused_lm_head_chunked_logprobs`: the single pass's forward on its chunks of whole sequences (the pass now),
  (c) `fused_lm_head_loss` with VESPO per chunk, gradients formed: the training pass.
Reported per shard and mix: max |a - c|, max |b - c| (expected exactly 0), whether b and c are bitwise equal
(entropies too), and whether exp(sum over each sequence of (c - b)) is exactly 1 (and the worst |.. - 1| for a).

    python bench/lm_head_on_policy_check.py --out OUT.json [--chunk-exp 29] [--cpu-smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vespo_megatron.losses import get_policy_loss  # noqa: E402
from vespo_megatron.parallel.fused_lm_head import fused_lm_head_logprobs  # noqa: E402
from vespo_megatron.parallel.fused_lm_head_loss import (  # noqa: E402
    fused_lm_head_chunked_logprobs,
    fused_lm_head_loss,
    plan_head_chunks,
)
from vespo_megatron.parallel.sequence import build_loss_inputs, global_normalizer  # noqa: E402

FULL = dict(dev="cuda", H=2048, V=151936, T=16384, equal=2048, lo=100, hi=4000, long=8192, chunk_exp=29.25)
# 2**18 elements: 87 tokens of V = 3000 (349 of its V/4 shard); the random mix holds some sequences whole over
# the budget, the long one (512 tokens) takes the recomputing tiles on the full vocabulary
SMOKE = dict(dev="cpu", H=64, V=3000, T=1024, equal=128, lo=10, hi=250, long=512, chunk_exp=18)


def mixes(s: dict, seed: int) -> dict[str, list[int]]:
    """Sequence lengths summing to T: equal ones, random ones (the last one trimmed), one long one and equal ones."""
    rng, rand, left = random.Random(seed), [], s["T"]
    while left > 0:
        rand.append(min(left, rng.randint(s["lo"], s["hi"])))
        left -= rand[-1]
    rest = s["T"] - s["long"]
    return {f"{s['T'] // s['equal']}x{s['equal']}": [s["equal"]] * (s["T"] // s["equal"]),
            f"random {s['lo']}-{s['hi']}": rand,
            f"{s['long']} + {rest // s['equal']}x{s['equal']}": [s["long"]] + [s["equal"]] * (rest // s["equal"])}


def vespo_chunk_loss(seq_tokens: list[int], old: torch.Tensor):
    """VESPO (default config) on each chunk of whole sequences, with the normaliser of the whole batch."""
    loss, dev = get_policy_loss("vespo"), old.device
    cfg, b = loss.default_config(), len(seq_tokens)
    token_seq = torch.repeat_interleave(torch.arange(b, device=dev), torch.tensor(seq_tokens, device=dev))
    mask = torch.ones_like(old)
    adv = torch.randn(b, generator=torch.Generator(device=dev).manual_seed(1), device=dev)
    norm = global_normalizer([mask], [token_seq], [b])

    def chunk_loss(c):
        t = slice(c.start, c.end)
        inputs = build_loss_inputs(logp=c.logprobs, old_logp=old[t], mask=mask[t], token_seq=token_seq[t] - c.seq_start,
                                   num_seqs=c.seq_end - c.seq_start, advantages=adv[c.seq_start:c.seq_end],
                                   differentiable_seq_log_ratio=loss.seq_grad(cfg))
        return loss(inputs, norm, cfg).loss

    return chunk_loss, token_seq


def check(hidden, weight, targets, seq_tokens: list[int], elements: int) -> dict:
    old = -torch.rand(targets.numel(), generator=torch.Generator(device=hidden.device).manual_seed(2),
                      device=hidden.device) * 4 - 9
    chunk_loss, token_seq = vespo_chunk_loss(seq_tokens, old)
    kw = dict(compute_entropy=True, chunk_elements=elements)
    with torch.no_grad():
        a = fused_lm_head_logprobs(hidden, weight, targets, **kw)
    b = fused_lm_head_chunked_logprobs(hidden, weight, targets, seq_tokens=seq_tokens, **kw)
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    c = fused_lm_head_loss(h, w, targets, chunk_loss, seq_tokens=seq_tokens, **kw)
    torch.autograd.grad(c.loss, (h, w))  # the training step's work, as it runs (the values are formed before)

    def seq_ratio(x):  # [B] exp(sum over each sequence of (c - x)), summed in float64 as a sequence's log W
        d = (c.logprobs.double() - x.logprobs.double())
        return torch.zeros(len(seq_tokens), dtype=torch.float64, device=d.device).index_add(0, token_seq, d).exp()

    ra, rb = seq_ratio(a), seq_ratio(b)
    plan, recompute = plan_head_chunks(seq_tokens, weight.shape[0], elements)
    return dict(sequences=len(seq_tokens), chunks=len(plan), recomputed=sum(recompute),
                max_abs_a_c=float((a.logprobs - c.logprobs).abs().max()),
                max_abs_b_c=float((b.logprobs - c.logprobs).abs().max()),
                b_equals_c=bool(torch.equal(b.logprobs, c.logprobs) and torch.equal(b.entropy, c.entropy)),
                ratio_b_exactly_1=bool((rb == 1.0).all()), max_abs_ratio_b_minus_1=float((rb - 1).abs().max()),
                max_abs_ratio_a_minus_1=float((ra - 1).abs().max()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--chunk-exp", type=float, default=None,
                    help="log2 of chunk_elements (default 29.25, the single pass's default; smoke 18)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = ap.parse_args()
    s = SMOKE if args.cpu_smoke else FULL
    if s["dev"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available (use --cpu-smoke for a tiny CPU run)")
    elements = int(2 ** (s["chunk_exp"] if args.chunk_exp is None else args.chunk_exp))
    g = torch.Generator(device=s["dev"]).manual_seed(args.seed)
    hidden = torch.randn(s["T"], s["H"], generator=g, device=s["dev"]).to(torch.bfloat16)
    weight = (torch.randn(s["V"], s["H"], generator=g, device=s["dev"]) * (2.0 / s["H"] ** 0.5)).to(torch.bfloat16)
    targets = torch.randint(0, s["V"], (s["T"],), generator=g, device=s["dev"])
    env = dict(device=torch.cuda.get_device_name() if s["dev"] == "cuda" else "cpu", torch=torch.__version__,
               chunk_elements=elements, **{k: s[k] for k in ("H", "V", "T")}, command=" ".join(sys.argv))
    rows = []
    for shard, v in (("V", s["V"]), ("V/4", s["V"] // 4)):
        for name, seq_tokens in mixes(s, args.seed).items():
            # (a V/4 shard with the targets of its own ids: the per-rank work of TP = 4, without the all-reduces)
            row = dict(shard=shard, mix=name, **check(hidden, weight[:v], targets % v, seq_tokens, elements))
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = list(rows[0])
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in cols) + " |")
    ok = all(r["b_equals_c"] and r["ratio_b_exactly_1"] for r in rows)
    print(f"\non-policy ratio exactly 1 with the chunked old-log-prob pass: {ok}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(env=env, rows=rows, all_exact=ok), f, indent=1)


if __name__ == "__main__":
    main()
