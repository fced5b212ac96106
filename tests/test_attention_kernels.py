"""The attention's fused path (torch SDPA, taken on CUDA) computes what the explicit fp32 reference computes.

CI has no GPU, so the fused path is forced on CPU (`reference_attention.FUSED_KERNELS = True`) and compared, values
and gradients of q / k / v, with the reference path and with a float64 loop, on every layout the trainer and the
engine hand it: packed sequences (THD; on real tokens: the fused path gives padding zeros, as transformer-
engine does, and padding never reaches a loss), a padded causal batch, a padded batch with megatron's attention mask,
a KV-cache step (sq < sk) and a one-token decode step over its cached keys (with either decode kernel).
"""

from __future__ import annotations

import pytest
import torch
from dist_harness import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.megatron]


def _loop(q, k, v, visible, scale):
    """float64 loop. q [sq, b, np, hn], k/v [sk, b, ng, hn], visible(b, i, j) -> bool. Returns [sq, b, np*hn]."""
    sq, b, nheads, hn = q.shape
    rep = nheads // k.shape[2]
    out = torch.zeros(sq, b, nheads, hn, dtype=torch.float64)
    for bi in range(b):
        for i in range(sq):
            keys = [j for j in range(k.shape[0]) if visible(bi, i, j)]
            for h in range(nheads):
                scores = torch.stack([q[i, bi, h] @ k[j, bi, h // rep] for j in keys]) * scale
                p = torch.softmax(scores, 0)
                out[i, bi, h] = sum(p[n] * v[j, bi, h // rep] for n, j in enumerate(keys))
    return out.reshape(sq, b, -1)


def _both_paths(attn, inputs, real=None, **kwargs):
    """Output and q / k / v gradients of both paths. `real` [t, 1] bool: the tokens a loss reaches (packed
    padding gets no gradient in training, and the fused path gives it zeros, as transformer-engine does)."""
    from vespo_megatron.megatron import reference_attention as ra

    result = {}
    for fused in (False, True):
        ra.FUSED_KERNELS = fused
        try:
            leaves = [x.clone().requires_grad_(True) for x in inputs]
            out = attn(*leaves, **kwargs)
            weight = torch.linspace(-1, 1, out.numel()).reshape(out.shape)  # a gradient that is not uniform
            if real is not None:
                weight = weight * real
            (out * weight).sum().backward()
            out = out.detach() if real is None else out.detach() * real
            result["fused" if fused else "reference"] = (out, [x.grad for x in leaves])
        finally:
            ra.FUSED_KERNELS = None
    return result


def _cases(rank, world_size):
    from megatron.core.transformer.enums import AttnMaskType

    from vespo_megatron.megatron import reference_attention as ra
    from vespo_megatron.megatron.model import TinyMoEConfig, transformer_config
    from vespo_megatron.megatron.parallel_setup import ParallelConfig, destroy_parallel, initialize_parallel
    from vespo_megatron.megatron.reference_attention import ReferenceAttention
    from vespo_megatron.parallel.cp_split import pack_sequences

    layout = ParallelConfig()
    groups = initialize_parallel(layout)
    try:
        cfg = TinyMoEConfig(hidden_size=32, num_layers=1, seq_length=32)  # 4 heads, 2 K/V groups: GQA
        attn = ReferenceAttention(transformer_config(cfg, layout), 1, AttnMaskType.causal, "self",
                                  pg_collection=groups.pg_collection)
        heads, ng, hn = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
        gen = torch.Generator().manual_seed(0)

        def qkv(sq, sk, b):
            return (torch.randn(sq, b, heads, hn, generator=gen), torch.randn(sk, b, ng, hn, generator=gen),
                    torch.randn(sk, b, ng, hn, generator=gen))

        out = {}
        # THD: 4 sequences of different lengths (one of length 1), padded to multiples of 2
        packed = pack_sequences([torch.arange(n) for n in (3, 6, 1, 5)], pad_multiple=2)
        q, k, v = (x[:, 0] for x in qkv(packed.num_tokens, packed.num_tokens, 1))
        seq = packed.seq_index
        real = torch.zeros(packed.num_tokens, 1, dtype=torch.bool)  # [t, 1]: real tokens, not padding
        for start, n in zip(packed.cu_seqlens_padded[:-1].tolist(), packed.lengths, strict=True):
            real[start:start + n] = True
        out["thd"] = (_both_paths(attn, (q, k, v), real, attention_mask=None,
                                  packed_seq_params=packed.packed_seq_params()),
                      _loop(q[:, None].double(), k[:, None].double(), v[:, None].double(),
                            lambda b, i, j: j <= i and seq[j] == seq[i], hn**-0.5).squeeze(1) * real)
        # padded causal batch
        q, k, v = qkv(7, 7, 3)
        out["causal"] = (_both_paths(attn, (q, k, v), attention_mask=None),
                         _loop(q.double(), k.double(), v.double(), lambda b, i, j: j <= i, hn**-0.5))
        # megatron's mask [b, 1, sq, sk], True = masked: left padding of 2 keys in row 1
        mask = torch.zeros(3, 1, 7, 7, dtype=torch.bool)
        mask[1, :, :, :2] = True
        mask[1, :, :2, 0] = False  # rows 0-1 keep key 0 so that no query row is empty
        keep = lambda b, i, j: j <= i and not bool(mask[b, 0, i, j])  # noqa: E731
        out["masked"] = (_both_paths(attn, (q, k, v), attention_mask=mask),
                         _loop(q.double(), k.double(), v.double(), keep, hn**-0.5))
        # KV cache: 3 new queries over 9 keys (causal offset 6)
        q, k, v = qkv(3, 9, 2)
        out["cache"] = (_both_paths(attn, (q, k, v), attention_mask=None),
                        _loop(q.double(), k.double(), v.double(), lambda b, i, j: j <= i + 6, hn**-0.5))
        # a decode step: 1 query over 9 cached keys, all visible (the fused path builds no mask)
        q, k, v = qkv(1, 9, 2)
        out["decode"] = (_both_paths(attn, (q, k, v), attention_mask=None),
                         _loop(q.double(), k.double(), v.double(), lambda b, i, j: True, hn**-0.5))
        # the same step with the fused path's other decode kernel: batched matmuls on the cache's views
        ra.DECODE_KERNEL = "bmm"
        try:
            out["decode_bmm"] = (_both_paths(attn, (q, k, v), attention_mask=None), out["decode"][1])
        finally:
            ra.DECODE_KERNEL = "sdpa"
    finally:
        destroy_parallel()
    return out


@pytest.fixture(scope="module")
def cases():
    return run_distributed(_cases, 1)[0]


@pytest.mark.parametrize("case", ["thd", "causal", "masked", "cache", "decode", "decode_bmm"])
def test_fused_path_matches_reference_and_float64_loop(cases, case):
    paths, loop = cases[case]
    ref_out, ref_grads = paths["reference"]
    out, grads = paths["fused"]
    torch.testing.assert_close(out.double(), loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6, msg=name)


def _sft_with_both_paths(rank, world_size, out_dir):
    """Token NLL per step and the final parameter norm of 3 SFT steps of the tiny testbed, once per path."""
    from vespo_megatron.experiments.testbed import TINY_MODEL_FLAGS
    from vespo_megatron.megatron import reference_attention as ra
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.sft import sft_steps
    from vespo_megatron.training.trainer import Trainer

    result = {}
    for fused in (False, True):
        ra.FUSED_KERNELS = fused
        try:
            cfg = train_cli.config_from_argv([
                "--base", "testbed", *TINY_MODEL_FLAGS, "--levels", "3,4", "--prompts-per-step", "8",
                "--group-size", "4", "--micro-batch-size", "16", "--threads", "1", "--sft-lr", "3e-3",
                "--no-console", "--out-dir", out_dir, "--run-name", f"fused{int(fused)}"])
            trainer = Trainer(cfg)
            nll = []

            def record(k, micro, outs, nll=nll):
                nll.append(-float(sum((o["logp"].reshape(-1) * m.loss_mask.reshape(-1)).sum()
                                      for m, o in zip(micro, outs, strict=True))))

            sft_steps(trainer, 0, 3, on_step=record)
            norm = float(sum(p.double().pow(2).sum() for p in trainer.model.parameters()))
            result["fused" if fused else "reference"] = (nll, norm)
        finally:
            ra.FUSED_KERNELS = None
            destroy_parallel()
    return result


def test_fused_path_trains_like_the_reference(tmp_path):
    """Packed SFT steps (THD micro-batches with padded tails) train the same with either path: the fused path's
    zeros on padding reach no loss and no real token."""
    result = run_distributed(_sft_with_both_paths, 1, str(tmp_path))[0]
    (ref_nll, ref_norm), (nll, norm) = result["reference"], result["fused"]
    assert ref_nll[0] > ref_nll[-1] > 0  # it learns, so the comparison is not between two constants
    assert nll == pytest.approx(ref_nll, rel=1e-5)
    assert norm == pytest.approx(ref_norm, rel=1e-8)


def test_thd_layout_is_computed_once_per_pack():
    """Every layer of a micro-batch gets the same cached layout (one host read of the lengths per pack, not one
    per layer); another pack, or a replaced cu_seqlens tensor, gets its own; the layout puts each real token at
    (its sequence, its position) of the padded batch, checked against a loop."""
    from vespo_megatron.compat import PackedSeqParams
    from vespo_megatron.megatron.reference_attention import cached_thd_layout

    def params(real, padded):
        return PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(real), cu_seqlens_kv=torch.tensor(real),
                               cu_seqlens_q_padded=torch.tensor(padded), cu_seqlens_kv_padded=torch.tensor(padded),
                               max_seqlen_q=8, max_seqlen_kv=8)

    pack = params([0, 3, 5, 9], [0, 4, 6, 12])
    first = cached_thd_layout(pack, torch.device("cpu"))
    assert cached_thd_layout(pack, torch.device("cpu")) is first
    src, dst = [], []
    for i, (start_real, end_real, start) in enumerate([(0, 3, 0), (3, 5, 4), (5, 9, 6)]):
        for j in range(end_real - start_real):
            src.append(start + j)
            dst.append(i * 4 + j)  # s_max = 4 real tokens
    assert (first.num_tokens, first.num_seqs, first.max_len) == (12, 3, 4)
    assert first.src.tolist() == src and first.dst.tolist() == dst
    other = cached_thd_layout(params([0, 2, 4], [0, 2, 4]), torch.device("cpu"))
    assert other is not first and other.num_tokens == 4
    pack.cu_seqlens_q_padded = torch.tensor([0, 3, 5, 9])  # a new tensor: recomputed, not the stale layout
    assert cached_thd_layout(pack, torch.device("cpu")).num_tokens == 9
