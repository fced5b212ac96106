"""Demo of the policy losses on synthetic data (CPU, a second or two).

Prints, for one response of `--length` tokens whose per-token log-ratio log(pi/mu) is constant, the VESPO
kernel phi(W) for both advantage signs and the gradient scale each loss puts on d log pi_t:

    scale = -(d loss / d log pi_t) * N_tokens / A      (1.0 = on-policy REINFORCE)

Run:  python -m vespo_megatron.demo [--length 16]
"""

from __future__ import annotations

import argparse

import torch

from vespo_megatron.losses import (
    LossNormalizer,
    build_local_inputs,
    get_policy_loss,
    make_loss_config,
    vespo_phi,
)

LOSSES = ["reinforce", "grpo", "gspo", "sapo", "vespo", "vespo_sqrt", "vespo_lin"]


def gradient_scale(name: str, log_w: float, length: int, adv: float) -> float:
    old = torch.full((length,), -1.0, dtype=torch.float64)
    logp = (old + log_w / length).requires_grad_(True)
    inputs = build_local_inputs(
        logp=logp, old_logp=old, mask=torch.ones(length, dtype=torch.bool),
        token_seq=torch.zeros(length, dtype=torch.long), num_seqs=1,
        advantages=torch.tensor([adv], dtype=torch.float64),
    )
    cfg = make_loss_config(name, aggregation="token_mean")
    out = get_policy_loss(name)(inputs, LossNormalizer(num_tokens=length, num_seqs=1), cfg)
    (grad,) = torch.autograd.grad(out.loss, logp)
    return float(-grad[0] * length / adv) + 0.0  # + 0.0 turns -0.0 into 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16, help="response length |y| in tokens")
    args = parser.parse_args(argv)
    grid = [-8.0, -3.0, -1.0, -0.25, 0.0, 0.25, 0.5, 1.0, 3.0, 8.0]
    for adv in (1.0, -1.0):
        sign = "A >= 0" if adv > 0 else "A < 0"
        print(f"\n{sign}: gradient scale per loss vs sequence log-weight log W (|y| = {args.length})")
        header = f"{'log W':>7} {'W':>9} {'phi(W)':>9} " + " ".join(f"{n:>10}" for n in LOSSES)
        print(header)
        print("-" * len(header))
        for log_w in grid:
            phi = vespo_phi(torch.tensor([log_w], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64))
            scales = [gradient_scale(n, log_w, args.length, adv) for n in LOSSES]
            print(f"{log_w:7.2f} {torch.tensor(log_w).exp().item():9.3g} {phi.item():9.3g} "
                  + " ".join(f"{s:10.4g}" for s in scales))
    print("\nVESPO keeps a smooth, sequence-level weight: 1 at W = 1, largest near W = c1/c2, vanishing for very\n"
          "stale or very unlikely responses; token clipping (grpo) zeroes individual tokens, GSPO's tight clip\n"
          "zeroes whole sequences, and the length-normalised ablations flatten the weight for long answers.")


if __name__ == "__main__":
    main()
