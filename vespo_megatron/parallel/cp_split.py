"""Megatron's load-balanced ("zigzag") context-parallel split, for padded and packed (THD) batches.

A sequence of length S (a multiple of 2*cp) is cut into 2*cp equal chunks; CP rank r keeps chunks r and
2*cp-1-r, so every rank gets the same share of causal-attention work. Packed THD batches are split one
sequence at a time, each sequence padded to a multiple of 2*cp first (what megatron and transformer-engine
expect with `cu_seqlens_q_padded`). Every split also returns the index map local -> global token index, so
any other per-token tensor (labels, masks, log-probs, routing ids) can be split the same way with
`x.index_select(dim, index)`.

Everything here is pure: no process groups, no globals; the CP rank and size are arguments.

Shape legend:
    B   batch size (padded layout)
    S   padded sequence length, a multiple of 2*cp
    N   number of sequences in a packed batch
    T   total tokens of a packed batch, each sequence padded (T = cu_seqlens_padded[-1])
    T_local  tokens kept by one CP rank (S/cp per row, or T/cp packed)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vespo_megatron.compat import PackedSeqParams


def _check_cp(cp_size: int, cp_rank: int) -> None:
    if cp_size < 1:
        raise ValueError(f"cp_size: expected >= 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank: expected in [0, {cp_size}), got {cp_rank}")


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[S/cp] int64: the positions of one sequence that CP rank `cp_rank` keeps, in order."""
    _check_cp(cp_size, cp_rank)
    if seq_len % (2 * cp_size) != 0:
        raise ValueError(f"seq_len: expected a multiple of 2*cp={2 * cp_size}, got {seq_len}")
    chunk = seq_len // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    second_start = (2 * cp_size - 1 - cp_rank) * chunk
    second = torch.arange(second_start, second_start + chunk)
    return torch.cat([first, second])


def split_padded(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int = 1):
    """Split a padded batch on `seq_dim` (e.g. [B, S] -> [B, S/cp]). Returns (local, index [S/cp])."""
    index = zigzag_indices(x.size(seq_dim), cp_size, cp_rank).to(x.device)
    return x.index_select(seq_dim, index), index


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def thd_zigzag_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """[T_local] int64: global token indices (into the padded packed tensor) that CP rank keeps.

    cu_seqlens_padded: [N+1] offsets of each padded sequence; every length a multiple of 2*cp.
    """
    _check_cp(cp_size, cp_rank)
    offsets = cu_seqlens_padded.tolist()
    parts = [
        zigzag_indices(end - start, cp_size, cp_rank) + start
        for start, end in zip(offsets[:-1], offsets[1:], strict=True)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(parts)


def split_thd(x: torch.Tensor, cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 0):
    """Split a packed tensor on token dim `dim` ([T, ...] -> [T_local, ...]). Returns (local, index)."""
    if x.size(dim) != int(cu_seqlens_padded[-1]):
        raise ValueError(
            f"x.size({dim}): expected cu_seqlens_padded[-1]={int(cu_seqlens_padded[-1])}, got {x.size(dim)}"
        )
    index = thd_zigzag_indices(cu_seqlens_padded, cp_size, cp_rank).to(x.device)
    return x.index_select(dim, index), index


@dataclass(frozen=True)
class PackedBatch:
    """Variable-length sequences packed into one row, each padded to a multiple of `pad_multiple`.

    tokens, position_ids: [1, T]   (batch dim 1, as megatron's GPTModel expects for THD)
    seq_index:    [T] int64, the sequence each token (padding included) belongs to
    valid:        [T] bool, False on padding
    cu_seqlens:          [N+1] int32, cumulative real lengths
    cu_seqlens_padded:   [N+1] int32, cumulative padded lengths (offsets in the packed tensor)
    """

    tokens: torch.Tensor
    position_ids: torch.Tensor
    seq_index: torch.Tensor
    valid: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_seqlens_padded: torch.Tensor
    lengths: tuple[int, ...]
    pad_multiple: int

    @property
    def num_tokens(self) -> int:
        return int(self.cu_seqlens_padded[-1])

    @property
    def max_seqlen_padded(self) -> int:
        return int((self.cu_seqlens_padded[1:] - self.cu_seqlens_padded[:-1]).max())

    def packed_seq_params(self) -> PackedSeqParams:
        """megatron's THD descriptor. max_seqlen is the longest padded sequence before any CP split."""
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=self.cu_seqlens,
            cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens_padded,
            cu_seqlens_kv_padded=self.cu_seqlens_padded,
            max_seqlen_q=self.max_seqlen_padded,
            max_seqlen_kv=self.max_seqlen_padded,
        )

    def cp_index(self, cp_size: int, cp_rank: int) -> torch.Tensor:
        """[T_local]: the global token indices CP rank keeps (index any [.., T, ..] tensor with it)."""
        return thd_zigzag_indices(self.cu_seqlens_padded, cp_size, cp_rank)

    def unpack(self, x: torch.Tensor, dim: int = 0) -> list[torch.Tensor]:
        """Per-sequence slices of a full packed tensor (padding dropped)."""
        starts = self.cu_seqlens_padded[:-1].tolist()
        return [x.narrow(dim, s, n) for s, n in zip(starts, self.lengths, strict=True)]


def pack_sequences(
    sequences: list[torch.Tensor], pad_multiple: int = 1, pad_value: int = 0
) -> PackedBatch:
    """Pack 1-D token sequences into one THD row. For CP use pad_multiple = 2*cp (times tp with SP)."""
    if not sequences:
        raise ValueError("sequences: expected at least one sequence, got none")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple: expected >= 1, got {pad_multiple}")
    lengths = [int(s.numel()) for s in sequences]
    if min(lengths) < 1:
        raise ValueError(f"sequences: expected non-empty sequences, got lengths {lengths}")
    padded = [round_up(n, pad_multiple) for n in lengths]
    dtype = sequences[0].dtype
    tokens, positions, seq_index, valid = [], [], [], []
    for i, (seq, n, p) in enumerate(zip(sequences, lengths, padded, strict=True)):
        tokens.append(torch.cat([seq.reshape(-1), torch.full((p - n,), pad_value, dtype=dtype)]))
        positions.append(torch.arange(p))
        seq_index.append(torch.full((p,), i, dtype=torch.long))
        valid.append(torch.arange(p) < n)
    zero = torch.zeros(1, dtype=torch.int32)
    return PackedBatch(
        tokens=torch.cat(tokens).unsqueeze(0),
        position_ids=torch.cat(positions).unsqueeze(0),
        seq_index=torch.cat(seq_index),
        valid=torch.cat(valid),
        cu_seqlens=torch.cat([zero, torch.tensor(lengths).cumsum(0).to(torch.int32)]),
        cu_seqlens_padded=torch.cat([zero, torch.tensor(padded).cumsum(0).to(torch.int32)]),
        lengths=tuple(lengths),
        pad_multiple=pad_multiple,
    )
