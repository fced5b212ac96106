"""Pure tests of the zigzag context-parallel split and the THD packer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vespo_megatron.parallel.cp_split import (
    pack_sequences,
    round_up,
    split_padded,
    split_thd,
    thd_zigzag_indices,
    zigzag_indices,
)


def _loop_reference(seq_len: int, cp: int, rank: int) -> list[int]:
    chunk = seq_len // (2 * cp)
    out = []
    for c in (rank, 2 * cp - 1 - rank):
        for i in range(chunk):
            out.append(c * chunk + i)
    return out


@given(cp=st.integers(1, 6), chunks=st.integers(1, 5))
def test_zigzag_matches_loop_and_partitions(cp, chunks):
    seq_len = 2 * cp * chunks
    parts = [zigzag_indices(seq_len, cp, r) for r in range(cp)]
    for r, p in enumerate(parts):
        assert p.tolist() == _loop_reference(seq_len, cp, r)
    assert sorted(torch.cat(parts).tolist()) == list(range(seq_len))


def test_zigzag_example_cp2():
    # 8 tokens, 4 chunks of 2: rank 0 keeps chunks 0 and 3, rank 1 keeps chunks 1 and 2.
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_split_padded_on_sequence_dim():
    x = torch.arange(2 * 12).reshape(2, 12)
    local, index = split_padded(x, cp_size=3, cp_rank=1, seq_dim=1)
    assert index.tolist() == [2, 3, 8, 9]
    torch.testing.assert_close(local, x[:, [2, 3, 8, 9]])


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="seq_len"):
        zigzag_indices(6, 2, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_indices(8, 2, 2)
    with pytest.raises(ValueError, match="pad_multiple"):
        pack_sequences([torch.arange(3)], pad_multiple=0)


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 20), min_size=1, max_size=5), cp=st.integers(1, 4))
def test_thd_split_partitions_each_sequence(lengths, cp):
    packed = pack_sequences([torch.arange(n) + 100 * i for i, n in enumerate(lengths)], pad_multiple=2 * cp)
    total = packed.num_tokens
    parts = [thd_zigzag_indices(packed.cu_seqlens_padded, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(total))
    starts = packed.cu_seqlens_padded.tolist()
    for r, p in enumerate(parts):
        expected = []
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            expected += [s + i for i in _loop_reference(e - s, cp, r)]
        assert p.tolist() == expected
        local, index = split_thd(packed.tokens, packed.cu_seqlens_padded, cp, r, dim=1)
        torch.testing.assert_close(local, packed.tokens[:, index])
        # every rank holds the same number of tokens of every sequence
        assert (packed.seq_index[index].bincount(minlength=len(lengths)) * cp).tolist() == [
            e - s for s, e in zip(starts[:-1], starts[1:], strict=True)
        ]


@settings(max_examples=50, deadline=None)
@given(lengths=st.lists(st.integers(1, 17), min_size=1, max_size=6), multiple=st.integers(1, 8))
def test_pack_round_trip(lengths, multiple):
    seqs = [torch.randint(0, 50, (n,)) for n in lengths]
    packed = pack_sequences(seqs, pad_multiple=multiple, pad_value=-1)
    assert packed.tokens.shape == (1, sum(round_up(n, multiple) for n in lengths))
    for original, got in zip(seqs, packed.unpack(packed.tokens[0]), strict=True):
        torch.testing.assert_close(got, original)
    assert packed.cu_seqlens.tolist() == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert int(packed.valid.sum()) == sum(lengths)
    assert (packed.tokens[0][~packed.valid] == -1).all()
    for i, pos in enumerate(packed.unpack(packed.position_ids[0])):
        assert pos.tolist() == list(range(lengths[i]))
    assert packed.seq_index.tolist() == sum(
        ([i] * round_up(n, multiple) for i, n in enumerate(lengths)), []
    )
    params = packed.packed_seq_params()
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.dtype == torch.int32
    assert params.max_seqlen_q == max(round_up(n, multiple) for n in lengths)
