"""Per-rank routing shards (issue 15, item 3): slicing against numpy indexing of the whole record, the
micro-batches and RouterReplay targets a shard gives against the whole-record path, the fixed-length pack's
inert tail, shard validation, and (gloo) the replica's scatter plus an exact R3 replay under CP2, PP2 and
TP2+SP on the tiny megatron MoE model.
"""

from __future__ import annotations

import dataclasses
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vespo_megatron.megatron.rl_batch import RLSample, build_rl_microbatch
from vespo_megatron.routing.alignment import global_routing_thd, replay_tensors
from vespo_megatron.routing.record import RoutingRecord, cp_token_positions
from vespo_megatron.routing.shards import RankPlan, shard_generations, shard_record

MOE_LAYERS = (0, 2, 3, 5)
K, E = 2, 8


def _record(n_prompt, n_out, seed, sample_id="s", moe_layers=MOE_LAYERS, has_last_row=False):
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((n_prompt + n_out - 1, len(moe_layers), E)), axis=-1)[..., :K].astype(np.uint8)
    rec = RoutingRecord(sample_id=sample_id, expert_ids=ids, num_prompt_tokens=n_prompt, num_output_tokens=n_out,
                        moe_layers=moe_layers, num_experts=E)
    return rec.with_last_row() if has_last_row else rec


def _zigzag_ref(seq_len, cp, r, pad):
    """Independent reference: the padded sequence as 2*cp equal chunks; rank r keeps chunks r and 2cp-1-r."""
    padded = -(-seq_len // pad) * pad
    chunks = np.arange(padded).reshape(2 * cp, padded // (2 * cp))
    pos = np.concatenate([chunks[r], chunks[2 * cp - 1 - r]])
    return pos[pos < seq_len]


# ------------------------------------------------------------------------------ slicing (pure)


@pytest.mark.parametrize("seq_len", [1, 2, 7, 8, 9, 31, 64])
@pytest.mark.parametrize("cp,pad", [(2, 4), (2, 8), (4, 8), (4, 16)])
def test_cp_token_positions_match_zigzag_reference(seq_len, cp, pad):
    shares = [cp_token_positions(seq_len, cp, r, pad) for r in range(cp)]
    for r, pos in enumerate(shares):
        np.testing.assert_array_equal(pos, _zigzag_ref(seq_len, cp, r, pad))
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(seq_len))  # a partition


def test_cp_token_positions_errors_name_the_field():
    with pytest.raises(ValueError, match="pad_multiple: expected a multiple of 2\\*cp_size=4, got 6"):
        cp_token_positions(10, 2, 0, 6)
    with pytest.raises(ValueError, match="cp_rank"):
        cp_token_positions(10, 2, 2, 4)


@pytest.mark.parametrize("has_last_row", [False, True])
@pytest.mark.parametrize("layers", [(0, 2, 3, 5), (2, 3), (5,), ()])
@pytest.mark.parametrize("cp,r,pad", [(1, 0, 1), (2, 0, 4), (2, 1, 4), (2, 1, 8), (4, 3, 8)])
def test_shard_record_is_numpy_indexing_of_the_whole_record(layers, cp, r, pad, has_last_row):
    n_prompt, n_out = 5, 14
    rec = _record(n_prompt, n_out, seed=1, has_last_row=has_last_row)
    shard = shard_record(rec, RankPlan(moe_layers=layers, cp_size=cp, cp_rank=r, pad_multiple=pad))
    cols = [MOE_LAYERS.index(n) for n in layers]
    assert shard.moe_layers == layers
    if cp == 1:
        assert shard.cp_share is None and shard.has_last_row == has_last_row
        np.testing.assert_array_equal(shard.expert_ids, rec.expert_ids[:, cols, :])
        return
    pos = _zigzag_ref(n_prompt + n_out, cp, r, pad)
    pos = pos[pos < n_prompt + n_out - 1]  # routed rows only: the final token has none (filled by the trainer)
    assert shard.cp_share == (cp, r, pad) and not shard.has_last_row
    np.testing.assert_array_equal(shard.token_positions(), pos)
    np.testing.assert_array_equal(shard.expert_ids, rec.expert_ids[pos][:, cols, :])
    assert shard.expert_ids.dtype == np.uint8 and shard.expert_ids.flags.c_contiguous


def test_shard_record_errors():
    rec = _record(4, 4, seed=0)
    with pytest.raises(ValueError, match=r"expected MoE layers \(1, 2\).*missing \(1,\)"):
        shard_record(rec, RankPlan(moe_layers=(1, 2)))
    shard = shard_record(rec, RankPlan(moe_layers=(2,), cp_size=2, cp_rank=0, pad_multiple=4))
    with pytest.raises(ValueError, match="expected a whole record, got a shard"):
        shard_record(shard, RankPlan(moe_layers=(2,)))
    with pytest.raises(ValueError, match="expert_ids: expected 3 rows"):
        RoutingRecord(sample_id="x", expert_ids=shard.expert_ids[:1], num_prompt_tokens=4, num_output_tokens=4,
                      moe_layers=(2,), num_experts=E, cp_share=(2, 0, 4))


def test_shard_generations_keeps_uncuttable_records_whole():
    from vespo_megatron.rollout.engine import Generation, SampleError

    good = Generation("a", (1, 2, 3), (4, 5), (-1.0, -1.0), 0, "stop", routing=_record(3, 2, seed=0))
    odd = dataclasses.replace(good, sample_id="b", routing=_record(3, 2, seed=0, moe_layers=(0, 1)))
    err = SampleError("c", "boom")
    out = shard_generations([good, odd, err], RankPlan(moe_layers=(2, 3), cp_size=2, cp_rank=1, pad_multiple=4))
    assert out[0].routing.moe_layers == (2, 3) and out[0].routing.cp_share == (2, 1, 4)
    assert out[1].routing is odd.routing and out[2] is err


# ------------------------------------------------------------------------------ micro-batches and targets


def _samples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (n_prompt, R) in enumerate(lengths):
        out.append(RLSample(prompt=torch.randint(0, 50, (n_prompt,), generator=g), response=torch.randint(0, 50, (R,), generator=g),
                            old_logp=torch.full((R,), -1.0), rollout_logp=torch.full((R,), -1.5), advantage=0.5,
                            routing=_record(n_prompt, R, seed=10 + i, sample_id=i)))
    return out


def _with_routing(samples, plan):
    return [dataclasses.replace(s, routing=shard_record(s.routing, plan)) for s in samples]


LENGTHS = [(3, 5), (4, 9), (2, 2), (6, 11)]


@pytest.mark.parametrize("cp,tp", [(1, 1), (2, 1), (2, 2), (4, 1)])
@pytest.mark.parametrize("layers", [(0, 2, 3, 5), (3, 5), (0,)])
def test_shard_microbatch_equals_whole_record_microbatch(cp, tp, layers):
    """Same micro-batch from whole records and from each rank's shard: its routing equals the whole one's on
    this rank's layers, bit for bit, and so do the RouterReplay targets of every TP (SP) rank."""
    pad = (2 * cp if cp > 1 else 1) * tp
    samples = _samples(LENGTHS)
    cols = [MOE_LAYERS.index(n) for n in layers]
    for r in range(cp):
        whole = build_rl_microbatch(samples, cp_size=cp, cp_rank=r, pad_multiple=pad)
        plan = RankPlan(moe_layers=layers, cp_size=cp, cp_rank=r, pad_multiple=pad)
        mb = build_rl_microbatch(_with_routing(samples, plan), cp_size=cp, cp_rank=r, pad_multiple=pad)
        assert mb.routed_experts.shape[0] == len(layers)
        torch.testing.assert_close(mb.routed_experts, whole.routed_experts[cols], rtol=0, atol=0)
        for t in range(tp):
            got = replay_tensors(mb.routed_experts, range(len(layers)), tp, t)
            want = replay_tensors(whole.routed_experts, cols, tp, t)
            for a, b in zip(got, want, strict=True):
                assert a.dtype == torch.int64
                torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shard_extended_by_the_pack_raises():
    """A longer pack pads its last sequence further, which moves that sequence's zigzag split."""
    samples = _with_routing(_samples(LENGTHS[:2]), RankPlan(moe_layers=MOE_LAYERS, cp_size=2, cp_rank=0, pad_multiple=4))
    with pytest.raises(ValueError, match="routing shard of sample 1: expected the pack to pad it to its own length"):
        build_rl_microbatch(samples, cp_size=2, cp_rank=0, pad_multiple=4, seq_len=64)


def test_padded_layout_rejects_shards():
    samples = _with_routing(_samples(LENGTHS[:2]), RankPlan(moe_layers=MOE_LAYERS, cp_size=2, cp_rank=0, pad_multiple=4))
    with pytest.raises(ValueError, match="padded layout"):
        build_rl_microbatch(samples, layout="padded", cp_size=2, cp_rank=0, pad_multiple=4)


def test_global_routing_thd_whole_records_unchanged_by_the_shard_code():
    """The whole-record path against a numpy reference: rows at their packed positions (the final token and
    the padding strided-filled)."""
    samples = _samples(LENGTHS[:2])
    recs = [s.routing for s in samples]
    lens = [n_prompt + R for n_prompt, R in LENGTHS[:2]]
    full = global_routing_thd(recs, lens, [0, 8], 24).numpy()
    np.testing.assert_array_equal(full[0:7], recs[0].expert_ids)
    np.testing.assert_array_equal(full[8:20], recs[1].expert_ids)
    assert ((full[7] == full[7, :1]).all()) and full[20:].shape == (4, 4, 2)


# ------------------------------------------------------------------------------ the batcher's tail


def _groups(cp, r, tp=1):
    return SimpleNamespace(cp_size=cp, cp_rank=r, tp_size=tp)


@pytest.mark.parametrize("cp,tp,sp", [(2, 1, False), (2, 2, True), (4, 1, False)])
def test_batcher_tail_takes_the_extra_padding(cp, tp, sp):
    from vespo_megatron.training.batching import MicroBatcher

    samples = _samples(LENGTHS)
    layers = (2, 3)
    cols = [MOE_LAYERS.index(n) for n in layers]
    for r in range(cp):
        batcher = MicroBatcher(_groups(cp, r, tp), sp=sp, longest=20, micro_batch_size=2, eos_id=7,
                               routing=(MOE_LAYERS, K, E))
        pm = batcher.pad_multiple
        plan = RankPlan(moe_layers=layers, cp_size=cp, cp_rank=r, pad_multiple=pm)
        filler = batcher.filler([1, 2])
        got = batcher.split(_with_routing(samples, plan), 3, filler)
        # Reference: the same packs, built from whole records, with an explicit two-token tail.
        tail = RLSample(prompt=torch.tensor([7]), response=torch.tensor([7]), old_logp=torch.zeros(1),
                        rollout_logp=torch.zeros(1), advantage=0.0,
                        routing=RoutingRecord(sample_id="t", expert_ids=np.zeros((1, 4, K), np.uint8) + np.arange(K, dtype=np.uint8),
                                              num_prompt_tokens=1, num_output_tokens=1, moe_layers=MOE_LAYERS,
                                              num_experts=E))
        bounds = [0, 1, 3, 4]
        for i, mb in enumerate(got):
            part = samples[bounds[i]:bounds[i + 1]]
            want = build_rl_microbatch(part + [tail], cp_size=cp, cp_rank=r, pad_multiple=pm, seq_len=batcher.packed_len)
            assert mb.tokens.shape[1] * cp == batcher.packed_len and mb.num_seqs == len(part) + 1
            torch.testing.assert_close(mb.routed_experts, want.routed_experts[cols], rtol=0, atol=0)
            for name in ("tokens", "labels", "position_ids", "token_seq", "old_logp", "rollout_logp", "token_index"):
                torch.testing.assert_close(getattr(mb, name), getattr(want, name), rtol=0, atol=0)
            tail_tokens = want.token_seq == len(part)
            assert want.loss_mask[tail_tokens].any() or r > 0  # the tail's own loss token, cleared below
            torch.testing.assert_close(mb.loss_mask, want.loss_mask & ~tail_tokens, rtol=0, atol=0)
            assert mb.packed_seq_params.cu_seqlens_q.tolist() == want.packed_seq_params.cu_seqlens_q.tolist()


def test_batcher_without_shards_is_unchanged():
    """Whole records (and PP-only shards, no cp_share): no tail, the last sequence padded as before."""
    from vespo_megatron.training.batching import MicroBatcher

    samples = _samples(LENGTHS)
    batcher = MicroBatcher(_groups(2, 1), sp=False, longest=20, micro_batch_size=2, eos_id=7, routing=(MOE_LAYERS, K, E))
    got = batcher.split(samples, 2, batcher.filler([1]))
    for mb, part in zip(got, (samples[:2], samples[2:]), strict=True):
        want = build_rl_microbatch(part, cp_size=2, cp_rank=1, pad_multiple=4, seq_len=batcher.packed_len)
        assert mb.num_seqs == 2
        for name in ("tokens", "loss_mask", "routed_experts", "token_index"):
            torch.testing.assert_close(getattr(mb, name), getattr(want, name), rtol=0, atol=0)


# ------------------------------------------------------------------------------ validation


def test_validate_generation_checks_shard_shapes():
    from vespo_megatron.rollout.engine import Generation
    from vespo_megatron.training.samples import validate_generation

    n_prompt, n_out = 4, 9
    gen = Generation("a", tuple(range(n_prompt)), tuple(range(n_out)), (-1.0,) * n_out, 0, "stop", routing=_record(n_prompt, n_out, seed=2))
    check = dict(vocab_size=100, num_moe_layers=len(MOE_LAYERS), top_k=K, need_routing=True)
    assert validate_generation(gen, **check) is None
    for plan in (RankPlan((2, 3)), RankPlan((3,), 2, 1, 4), RankPlan(MOE_LAYERS, 4, 2, 8)):
        assert validate_generation(shard_generations([gen], plan)[0], **check) is None
    shard = shard_record(gen.routing, RankPlan((3,), 2, 1, 4))
    longer = dataclasses.replace(gen, output_ids=gen.output_ids + (1,), output_logprobs=gen.output_logprobs + (-1.0,))
    assert validate_generation(dataclasses.replace(longer, routing=shard), **check) == "routing_shape"
    assert validate_generation(gen, **{**check, "top_k": 3}) == "routing_shape"
    assert validate_generation(dataclasses.replace(gen, routing=shard), **{**check, "num_moe_layers": 0}) == "routing_shape"


# ------------------------------------------------------------------------------ gloo: the replica's scatter


class _FakeEngine:
    """Generates fixed generations (whole routing) on the replica's first rank; counts its calls."""

    def __init__(self, gens):
        self.gens, self.calls, self.weight_version = gens, 0, 0

    def generate(self, requests, *, seed):
        self.calls += 1
        return list(self.gens)


def _fake_generations(n=3, n_prompt=6, n_out=21, moe_layers=MOE_LAYERS):
    from vespo_megatron.rollout.engine import Generation, SampleError

    gens = [Generation(f"g{i}", tuple(range(n_prompt)), tuple(range(n_out + i)), (-1.0,) * (n_out + i), 0, "stop",
                       routing=_record(n_prompt, n_out + i, seed=i, sample_id=f"g{i}", moe_layers=moe_layers)) for i in range(n)]
    return [*gens, SampleError("bad", "engine error")]


def _scatter_worker(rank, world_size):
    from vespo_megatron.rollout.replica import ReplicaEngine, replica_of

    # 2 ranks, one replica, different plans: (layers 0, 2; CP rank 0) and (layers 3, 5; CP rank 1), as a
    # PP2 x CP2 replica's ranks 0 and 3 (4 processes would only cost the shared CPU more).
    plan = RankPlan(moe_layers=(0, 2) if rank == 0 else (3, 5), cp_size=2, cp_rank=rank, pad_multiple=4)
    replica = replica_of(0, 1)
    inner = _FakeEngine(_fake_generations() if replica.is_source else [])
    engine = ReplicaEngine(inner, replica, plan=plan)
    got = engine.generate([], seed=0)
    whole = ReplicaEngine(inner, replica).generate([], seed=0)  # the old path: everything broadcast
    return {"plan": plan, "got": got, "calls": inner.calls, "bytes": len(pickle.dumps(got)),
            "whole_bytes": len(pickle.dumps(whole)), "whole": whole}


@pytest.mark.distributed
def test_replica_scatters_each_rank_its_shard():
    from dist_harness import run_distributed

    results = run_distributed(_scatter_worker, 2)
    gens = _fake_generations()
    for rank, res in enumerate(results):
        assert res["calls"] == (2 if rank == 0 else 0)  # only the source generates
        assert [g.sample_id for g in res["got"]] == [g.sample_id for g in gens]
        for got, whole, ref in zip(res["got"], res["whole"], gens, strict=True):
            if getattr(ref, "routing", None) is None:
                assert type(got) is type(ref) and str(got) == str(ref)
                continue
            assert (got.prompt_ids, got.output_ids, got.output_logprobs) == (ref.prompt_ids, ref.output_ids,
                                                                            ref.output_logprobs)
            want = shard_record(ref.routing, res["plan"])
            assert got.routing.moe_layers == want.moe_layers and got.routing.cp_share == want.cp_share
            np.testing.assert_array_equal(got.routing.expert_ids, want.expert_ids)
            np.testing.assert_array_equal(whole.routing.expert_ids, ref.routing.expert_ids)
        # 2 of 4 layers x half of the tokens: about a quarter of the routing bytes
        routing = sum(g.routing.nbytes for g in res["got"] if getattr(g, "routing", None) is not None)
        assert routing * 4 <= sum(g.routing.nbytes for g in gens if getattr(g, "routing", None) is not None) + 4 * 64
        assert res["bytes"] < res["whole_bytes"]


# ------------------------------------------------------------------------------ gloo: exact R3 replay

REPLAY_LAYOUTS = ("cp2", "pp2", "tp2_sp")


def _synthetic_records(samples, seed=5):
    """{(m, j): whole record}: K distinct random experts per row and MoE layer (tiny model: layers 0, 2, 3)."""
    from vespo_megatron.routing import RoutingRecord

    rng = np.random.default_rng(seed)
    out = {}
    for m, mb in enumerate(samples):
        for j, s in enumerate(mb):
            n_prompt, n_out = s.prompt.numel(), s.response.numel()
            ids = np.argsort(rng.random((n_prompt + n_out - 1, 3, 8)), axis=-1)[..., :2].astype(np.uint8)
            out[(m, j)] = RoutingRecord(sample_id=f"{m}-{j}", expert_ids=ids, num_prompt_tokens=n_prompt,
                                        num_output_tokens=n_out, moe_layers=(0, 2, 3), num_experts=8)
    return out


def _replay_worker(rank, world_size):
    import test_routing_replay as trr

    from vespo_megatron.rollout.engine import Generation
    from vespo_megatron.rollout.replica import ReplicaEngine, replica_of
    from vespo_megatron.routing.replay import RoutingReplay, RoutingReplayConfig
    from vespo_megatron.routing.shards import rank_moe_layers
    from vespo_megatron.training.batching import MicroBatcher

    results = {}
    for name in REPLAY_LAYOUTS:
        layout = trr.LAYOUTS[name]
        ctx = trr._Ctx(layout, "thd")
        try:
            g = ctx.groups
            plain = trr._samples(ctx.cfg.vocab_size)
            records = _synthetic_records(plain)
            nested = trr._samples(ctx.cfg.vocab_size, routing=records)
            flat = [s for mb in nested for s in mb]
            longest = max(s.prompt.numel() + s.response.numel() for s in flat)
            batcher = MicroBatcher(g, sp=layout.sp, longest=longest, micro_batch_size=2, eos_id=0,
                                   routing=((0, 2, 3), 2, 8))
            # Transport: the replica's first rank holds the whole generations; each rank receives its shard.
            plan = RankPlan(moe_layers=rank_moe_layers(ctx.model), cp_size=g.cp_size, cp_rank=g.cp_rank,
                            pad_multiple=batcher.pad_multiple)
            gens = [Generation(str(s.routing.sample_id), tuple(s.prompt.tolist()), tuple(s.response.tolist()),
                               tuple(s.old_logp.tolist()), 0, "stop", routing=s.routing) for s in flat]
            replica = replica_of(g.dp_rank, g.dp_size)
            got = ReplicaEngine(_FakeEngine(gens if replica.is_source else []), replica, plan=plan).generate([], seed=0)
            shard_samples = [dataclasses.replace(s, routing=gen.routing) for s, gen in zip(flat, got, strict=True)]
            filler = batcher.filler([1])
            sharded = batcher.split(shard_samples, trr.NUM_MB, filler)
            # The whole-record path on the same packs (with the same inert tail when the batcher added one).
            whole = []
            for mb, part in zip(sharded, (flat[:2], flat[2:]), strict=True):
                tail = []
                if mb.num_seqs > len(part):
                    tail = [dataclasses.replace(filler, prompt=torch.tensor([0]), response=torch.tensor([0]), rollout_logp=None,
                                                routing=RoutingRecord(sample_id="t", expert_ids=filler.routing.expert_ids[:1],
                                                                      num_prompt_tokens=1, num_output_tokens=1,
                                                                      moe_layers=(0, 2, 3), num_experts=8))]
                w = build_rl_microbatch(part + tail, cp_size=g.cp_size, cp_rank=g.cp_rank,
                                        pad_multiple=batcher.pad_multiple, seq_len=batcher.packed_len)
                whole.append(dataclasses.replace(w, loss_mask=w.loss_mask & (w.token_seq < len(part))))
            out = {"plan": plan, "shard_layers": [mb.routed_experts.shape[0] for mb in sharded],
                   "bytes_shard": sum(x.routing.nbytes for x in got), "bytes_whole": sum(x.routing.nbytes for x in gens),
                   "pad_multiple": batcher.pad_multiple, "num_seqs": [mb.num_seqs for mb in sharded]}
            for variant, mbs in (("whole", whole), ("shard", sharded)):
                ctx.mbs, ctx.mine, ctx.rows = mbs, list(range(len(mbs))), 1
                ctx.seq = mbs[0].tokens.size(1) * g.cp_size
                replay = RoutingReplay(RoutingReplayConfig(mode="r3"), [ctx.model], tp_size=g.tp_size,
                                       tp_rank=g.tp_rank, spec=trr._spec())
                probe = trr._Probe(replay)
                logits, _, m_old = trr._pass(ctx, replay, "old_logp", forward_only=True)
                dispatched_old = trr._gather_routing(ctx, probe.dispatched)
                probe.reset()
                upd_logits, loss, m_upd = trr._pass(ctx, replay, "update", forward_only=False)
                losses = [None] * g.world_size
                import torch.distributed as dist

                dist.all_gather_object(losses, (loss, g.is_last_stage and g.tp_rank == 0))
                out[variant] = {"dispatched_old": dispatched_old, "dispatched_upd": trr._gather_routing(ctx, probe.dispatched),
                                "logits": trr._gather_logits(ctx, logits), "upd_logits": trr._gather_logits(ctx, upd_logits),
                                "metrics_old": trr._reduce(m_old, ctx), "metrics_upd": trr._reduce(m_upd, ctx),
                                "loss": sum(x for x, counted in losses if counted)}
                probe.remove()
                replay.close()
            out["records"] = records
            results[name] = out
        finally:
            ctx.close()
    return results


@pytest.mark.distributed
@pytest.mark.megatron
def test_r3_replay_from_shards_is_exact():
    """CP2, PP2, TP2+SP (2 gloo processes, tiny MoE model, THD): the shards the replica scatters give the same
    dispatched ids, logits, loss and agreement metrics as whole records, bit for bit; the dispatched ids are
    the records' ids on every real token."""
    from dist_harness import run_distributed

    runs = run_distributed(_replay_worker, 2)
    for name in REPLAY_LAYOUTS:
        per_rank = [r[name] for r in runs]
        res = per_rank[0]
        whole, shard = res["whole"], res["shard"]
        for key in ("dispatched_old", "dispatched_upd"):
            assert whole[key].keys() == shard[key].keys() and whole[key]
            for k, ids in whole[key].items():
                torch.testing.assert_close(shard[key][k], ids, rtol=0, atol=0, msg=(name, key, k))
        for key in ("logits", "upd_logits"):
            for i, x in whole[key].items():
                torch.testing.assert_close(shard[key][i], x, rtol=0, atol=0, msg=(name, key, i))
        assert shard["loss"] == whole["loss"] != 0.0, name
        assert shard["metrics_old"] == whole["metrics_old"] and shard["metrics_upd"] == whole["metrics_upd"], name
        assert 0.0 < whole["metrics_old"]["routing/agree_exact"] < 1.0  # random records: replay is not live routing
        # Not two identical wrong answers: the dispatched ids are the records' ids on every real token.
        pm, records = res["pad_multiple"], res["records"]
        for (m, layer), ids in whole["dispatched_upd"].items():
            start = 0
            for j in range(2):
                rec = records[(m, j)]
                want = torch.from_numpy(rec.expert_ids[:, (0, 2, 3).index(layer)].astype(np.int64))
                got = ids[start : start + rec.num_routed_rows].sort(dim=-1).values
                torch.testing.assert_close(got, want.sort(dim=-1).values, rtol=0, atol=0, msg=(name, m, layer, j))
                start += -(-(rec.num_prompt_tokens + rec.num_output_tokens) // pm) * pm
        # What was exercised: layer shards under PP, token shards (and the tail) under CP.
        plans = [r["plan"] for r in per_rank]
        if name == "pp2":
            assert [p.moe_layers for p in plans] == [(0,), (2, 3)] and [r["shard_layers"] for r in per_rank] == [[1, 1], [2, 2]]
        if name == "cp2":
            assert [p.cp_rank for p in plans] == [0, 1] and 3 in res["num_seqs"]  # a tail took the extra padding
        if name != "tp2_sp":
            assert all(r["bytes_shard"] < 0.8 * r["bytes_whole"] for r in per_rank), name  # routing ids received


# ------------------------------------------------------------------------------ gloo: the trainer end to end


def _train_runs(rank, world_size, out_dir):
    """The RL loop with the SGLang engine (local test server) and R3 on 2 ranks: PP2 with shards and with the
    old whole broadcast (no tail there: the same packs, so the same numbers), then CP2 with shards."""
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.rollout import replica as replica_mod
    from vespo_megatron.testing import FakeSGLangServer, hash_policy
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    def run(parallel, tag, whole=False):
        init = replica_mod.ReplicaEngine.__init__
        if whole:  # the path before shards: no plan, generations broadcast whole
            replica_mod.ReplicaEngine.__init__ = lambda self, inner, replica, plan=None: init(self, inner, replica)
        try:
            with FakeSGLangServer(hash_policy(vocab_size=64), num_hidden_layers=2, top_k=2, num_experts=4) as server:
                cfg = train_cli.config_from_argv([
                    "--hidden-size", "32", "--prompts-per-step", "2", "--group-size", "4", "--micro-batch-size", "4",
                    "--staleness", "2", "--sft-steps", "0", "--steps", "2", "--rollout-engine", "sglang",
                    "--sglang-url", server.url, "--routing-replay", "r3", "--rollout-correction", "tis",
                    "--out-dir", f"{out_dir}/{tag}", "--threads", "1", *parallel])
                trainer = Trainer(cfg)
                history = trainer.run()
                return history, trainer.engine.plans
        finally:
            replica_mod.ReplicaEngine.__init__ = init
            destroy_parallel()

    return {"pp2": run(["--pp", "2"], "pp2"), "pp2_whole": run(["--pp", "2"], "pp2_whole", whole=True),
            "cp2": run(["--cp", "2"], "cp2")}


def _same(x, y) -> bool:
    return x == y or (x != x and y != y)  # NaN (e.g. a metric over no negative-advantage sample) equals NaN


@pytest.mark.distributed
@pytest.mark.megatron
def test_trainer_with_sglang_r3_receives_shards(tmp_path):
    import math

    from dist_harness import run_distributed

    runs = run_distributed(_train_runs, 2, str(tmp_path))
    for rank_runs in runs:
        (pp2, plans), (whole, no_plans), (cp2, cp_plans) = rank_runs["pp2"], rank_runs["pp2_whole"], rank_runs["cp2"]
        assert no_plans is None
        assert [p.moe_layers for p in plans] == [(0,), (1,)] and [p.cp_rank for p in cp_plans] == [0, 1]
        # Layer shards change nothing but the bytes: the replayed routing (agreement) and the log-probs it gives
        # (mismatch against the server's) are the same to the last bit; only wall times differ.
        diff = {k: (a[k], b.get(k)) for a, b in zip(pp2, whole, strict=True) for k in a
                if not _same(a[k], b.get(k)) and not k.startswith("time/")}
        assert not diff, diff
        assert pp2[0].get("mismatch/kl_k3", 1.0) > 0 and "routing/agree_exact/layer1" in pp2[0]
        for history in (pp2, cp2):
            assert len(history) == 2
            for values in history:
                assert math.isfinite(values.get("loss", 0.0)) and 0 <= values["routing/agree_exact"] <= 1
    for run in ("pp2", "cp2"):  # the logging rank (last stage) has the loss and the log-prob metrics
        assert any("loss" in r[run][0][0] and r[run][0][0]["mismatch/kl_k3"] > 0 for r in runs), run
