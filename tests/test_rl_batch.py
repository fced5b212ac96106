"""RL samples -> micro-batch: label/mask/log-prob alignment and the CP split, against plain loops."""

from __future__ import annotations

import pytest
import torch

from vespo_megatron.megatron.rl_batch import RLSample, build_rl_microbatch


def samples(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        out.append(RLSample(prompt=torch.randint(1, 50, (P,), generator=g), response=torch.randint(1, 50, (R,), generator=g),
                            old_logp=-torch.rand(R, generator=g), advantage=float(i) - 1.5,
                            rollout_logp=-torch.rand(R, generator=g)))
    return out


@pytest.mark.parametrize("layout", ["thd", "padded"])
@pytest.mark.parametrize("cp", [1, 2, 3])
def test_alignment_and_cp_cover(layout, cp):
    ss = samples()
    parts = [build_rl_microbatch(ss, layout=layout, cp_size=cp, cp_rank=r, pad_multiple=2 * cp) for r in range(cp)]
    # Every response token is scored exactly once across CP ranks, at the right label, with its log-probs.
    seen = {}
    for mb in parts:
        m = mb.loss_mask.reshape(-1)
        for seq, label, old, roll in zip(mb.token_seq.reshape(-1)[m].tolist(), mb.labels.reshape(-1)[m].tolist(),
                                         mb.old_logp.reshape(-1)[m].tolist(), mb.rollout_logp.reshape(-1)[m].tolist(),
                                         strict=True):
            seen.setdefault(seq, []).append((label, old, roll))
    for i, s in enumerate(ss):
        got = sorted(seen[i])
        want = sorted(zip(s.response.tolist(), s.old_logp.tolist(), s.rollout_logp.tolist(), strict=True))
        assert got == want
    # Input tokens: the union of the CP shards, put back by token_index, is the unsplit batch.
    whole = build_rl_microbatch(ss, layout=layout, pad_multiple=2 * cp)
    rebuilt = torch.full_like(whole.tokens, -1)
    for mb in parts:
        rebuilt[:, mb.token_index] = mb.tokens
    assert torch.equal(rebuilt, whole.tokens)
    # Labels are next tokens within each sequence.
    for i, s in enumerate(ss):
        seq = torch.cat([s.prompt, s.response])
        row = whole.token_seq.reshape(-1) == i
        toks, labs = whole.tokens.reshape(-1)[row][: seq.numel()], whole.labels.reshape(-1)[row][: seq.numel()]
        assert torch.equal(toks, seq) and torch.equal(labs[:-1], seq[1:])


def test_bad_samples_raise():
    with pytest.raises(ValueError, match=r"RLSample.old_logp: expected shape \(3,\)"):
        RLSample(prompt=torch.tensor([1]), response=torch.tensor([1, 2, 3]), old_logp=torch.zeros(2), advantage=0.0)
    with pytest.raises(ValueError, match=r"RLSample.response: expected a non-empty"):
        RLSample(prompt=torch.tensor([1]), response=torch.tensor([], dtype=torch.long), old_logp=torch.zeros(0), advantage=0.0)
    with pytest.raises(ValueError, match=r"pad_multiple: expected a multiple of 2\*cp_size=4, got 2"):
        build_rl_microbatch(samples(), cp_size=2, pad_multiple=2)
