# Shape legend (used in comments and names below):
#   [N]      routed token rows of one sample: token positions first_row .. first_row + N - 1
#   [L]      all decoder layers of the model (num_hidden_layers), dense ones included
#   [L_moe]  the MoE layers only, in model order (RoutingSpec.moe_layers)
#   [K]      top-k slots per token (num_experts_per_tok)
#   [N_r]    a per-rank shard's token rows (RoutingRecord.cp_share): positions token_positions()
"""Compact per-sample MoE routing (the R3 routing-replay input) and the model facts needed to read it.

:class:`RoutingSpec` says which of the model's layers are MoE and how many experts each token picks.
:class:`RoutingRecord` holds one sample's routed expert ids ``[N, L_moe, K]`` in the narrowest dtype
that holds every id: ``uint8`` for at most 256 experts, ``int16`` up to 32768 (ids up to 32767). For
Qwen3-30B-A3B (48 MoE layers, top-8 of 128) that is 384 bytes per token instead of the 2048 of int32,
and megatron's ``RouterReplay`` gets int64 only at the moment it is handed the tensors
(:meth:`RoutingRecord.to_int64` / :meth:`RoutingRecord.per_layer_int64`).

Rows that no router produced (the last generated token, which SGLang never feeds through the model, and
padding) are filled by :func:`strided_fill`: ids spread round-robin across the experts, so that a
constant id does not send every such token to the same expert and hence the same EP rank.

A record may be a per-rank *shard* (`vespo_megatron.routing.shards`): ``moe_layers`` then names only the
layers one pipeline stage replays, and ``cp_share = (cp_size, cp_rank, pad_multiple)`` says that its rows
are only the routed token positions that CP rank keeps of the sample padded to a multiple of
``pad_multiple`` (:func:`cp_token_positions`), in increasing order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from vespo_megatron.models import family_for_config

__all__ = ["MAX_EXPERTS", "RoutingRecord", "RoutingSpec", "compact_dtype", "cp_token_positions", "strided_fill"]

# Expert ids must fit in int16 (the widest compact dtype): ids 0 .. 32767.
MAX_EXPERTS = 1 << 15


def compact_dtype(num_experts: int) -> np.dtype:
    """The narrowest dtype holding ids ``[0, num_experts)``: uint8 up to 256 experts, int16 up to 32768."""
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected an int in [1, {MAX_EXPERTS}], got {num_experts!r}")
    return np.dtype(np.uint8) if num_experts <= 256 else np.dtype(np.int16)


def strided_fill(num_rows: int, num_layers: int, top_k: int, num_experts: int, offset: int = 0) -> np.ndarray:
    """Synthetic routing ``[num_rows, num_layers, top_k]``: row r, slot k -> ``((offset + r) * top_k + k) % E``.

    Consecutive rows walk through all experts, so N filled rows put about ``N * top_k / E`` tokens on each
    expert instead of N on one; the ``top_k`` ids of a row are distinct (``top_k <= E``), as a router's are.
    Pass ``offset`` = the row's position in the sequence to keep neighbouring fills from lining up.
    """
    for name, value, low in (("num_rows", num_rows, 0), ("num_layers", num_layers, 0), ("top_k", top_k, 1),
                             ("offset", offset, 0)):
        _check_int(name, value, low)
    dtype = compact_dtype(num_experts)
    if top_k > num_experts:
        raise ValueError(f"top_k: expected <= num_experts={num_experts}, got {top_k}")
    rows = np.arange(offset, offset + num_rows, dtype=np.int64)[:, None] * top_k + np.arange(top_k)  # [N, K]
    ids = (rows % num_experts).astype(dtype)
    return np.ascontiguousarray(np.broadcast_to(ids[:, None, :], (num_rows, num_layers, top_k)))


def cp_token_positions(seq_len: int, cp_size: int, cp_rank: int, pad_multiple: int) -> np.ndarray:
    """Sorted int64 positions ``< seq_len`` that CP rank ``cp_rank`` keeps of one sequence of ``seq_len``
    tokens padded to a multiple of ``pad_multiple`` (megatron's zigzag: chunks r and 2*cp-1-r of 2*cp).

    Same split as `vespo_megatron.parallel.cp_split.zigzag_indices` on ``round_up(seq_len, pad_multiple)``
    (written out here so that this module needs no torch code for it).
    """
    _check_int("seq_len", seq_len, 0)
    _check_int("cp_size", cp_size, 1)
    _check_int("pad_multiple", pad_multiple, 1)
    if not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank: expected an int in [0, {cp_size}), got {cp_rank!r}")
    if pad_multiple % (2 * cp_size) and cp_size > 1:
        raise ValueError(f"pad_multiple: expected a multiple of 2*cp_size={2 * cp_size}, got {pad_multiple}")
    if cp_size == 1:
        return np.arange(seq_len, dtype=np.int64)
    padded = -(-seq_len // pad_multiple) * pad_multiple
    chunk = padded // (2 * cp_size)
    second = (2 * cp_size - 1 - cp_rank) * chunk
    first = np.arange(cp_rank * chunk, min((cp_rank + 1) * chunk, seq_len), dtype=np.int64)
    return np.concatenate([first, np.arange(second, min(second + chunk, seq_len), dtype=np.int64)])


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class RoutingSpec:
    """Routing facts of one model: layer count, which layers are MoE, top-k and expert count.

    ``moe_layers`` are 0-based indices into the model's ``num_hidden_layers`` decoder layers, strictly
    increasing. SGLang's payload has a row for every layer; :class:`RoutingRecord` keeps only these.
    """

    num_hidden_layers: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int

    def __post_init__(self) -> None:
        _check_int("num_hidden_layers", self.num_hidden_layers, 1)
        _check_int("top_k", self.top_k, 1)
        compact_dtype(self.num_experts)  # validates num_experts
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected <= num_experts={self.num_experts}, got {self.top_k}")
        layers = self.moe_layers
        if not isinstance(layers, tuple) or not layers:
            raise ValueError(f"moe_layers: expected a non-empty tuple of layer indices, got {layers!r}")
        for i in layers:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_hidden_layers:
                raise ValueError(f"moe_layers: expected ints in [0, {self.num_hidden_layers}), got {layers!r}")
        if any(a >= b for a, b in zip(layers, layers[1:], strict=False)):
            raise ValueError(f"moe_layers: expected strictly increasing indices, got {layers!r}")

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def all_moe(self) -> bool:
        return len(self.moe_layers) == self.num_hidden_layers

    @property
    def dtype(self) -> np.dtype:
        """Compact dtype of this model's expert ids (uint8 or int16)."""
        return compact_dtype(self.num_experts)

    @classmethod
    def from_hf_config(cls, config: Mapping) -> RoutingSpec:
        """From the ``config.json`` dict of a registered model family (``vespo_megatron.models``): the family
        says which layers are MoE, the top-k and the expert count."""
        if not isinstance(config, Mapping):
            raise ValueError(f"config: expected a mapping (HF config.json), got {type(config).__name__}")
        family = family_for_config(config)
        return cls(num_hidden_layers=family.num_layers(config), moe_layers=family.moe_layers(config),
                   top_k=family.experts_per_token(config), num_experts=family.num_experts(config))


@dataclass(frozen=True)
class RoutingRecord:
    """One sample's routed expert ids ``expert_ids [N, L_moe, K]`` (uint8 / int16, read-only).

    Row i is token position ``first_row + i`` of the sample's full sequence (prompt then output). SGLang
    routes positions ``0 .. P + O - 2``; the last output token has no row until :meth:`with_last_row`
    appends a synthetic one, so N is ``P + O - 1 - first_row`` or, with that row, one more.
    """

    sample_id: str | int
    expert_ids: np.ndarray
    num_prompt_tokens: int
    num_output_tokens: int
    moe_layers: tuple[int, ...]
    num_experts: int
    first_row: int = 0
    has_last_row: bool = field(default=False)
    cp_share: tuple[int, int, int] | None = None  # shard: (cp_size, cp_rank, pad_multiple), rows = token_positions()

    def __post_init__(self) -> None:
        _check_int("num_prompt_tokens", self.num_prompt_tokens, 1)
        _check_int("num_output_tokens", self.num_output_tokens, 0)
        _check_int("first_row", self.first_row, 0)
        dtype = compact_dtype(self.num_experts)
        ids = self.expert_ids
        if not isinstance(ids, np.ndarray) or ids.ndim != 3 or ids.dtype != dtype:
            got = f"{type(ids).__name__} {getattr(ids, 'dtype', '')} {getattr(ids, 'shape', '')}"
            raise ValueError(f"expert_ids: expected a 3-d numpy array [N, L_moe, K] of {dtype}, got {got}")
        if ids.shape[1] != len(self.moe_layers):
            raise ValueError(f"expert_ids: expected {len(self.moe_layers)} MoE layers (len(moe_layers)) on "
                             f"axis 1, got shape {ids.shape}")
        if self.cp_share is not None:
            share = self.cp_share
            if not isinstance(share, tuple) or len(share) != 3:
                raise ValueError(f"cp_share: expected (cp_size, cp_rank, pad_multiple), got {share!r}")
            if self.has_last_row:
                raise ValueError("has_last_row: expected False on a CP shard (the last row is filled where used)")
            want = len(self.token_positions())  # validates the share
            if ids.shape[0] != want:
                raise ValueError(f"expert_ids: expected {want} rows (routed positions of CP share "
                                 f"cp_size, cp_rank, pad_multiple={share}), got {ids.shape[0]}")
            want = None
        else:
            want = self.num_routed_rows + (1 if self.has_last_row else 0)
        if want is not None and ids.shape[0] != want:
            raise ValueError(f"expert_ids: expected {want} rows (P={self.num_prompt_tokens} + "
                             f"O={self.num_output_tokens} - 1 - first_row={self.first_row}"
                             f"{' + 1 last row' if self.has_last_row else ''}), got {ids.shape[0]}")
        if ids.flags.writeable:
            ids = ids.view()
            ids.flags.writeable = False
            object.__setattr__(self, "expert_ids", ids)

    @property
    def num_routed_rows(self) -> int:
        """Rows SGLang routed: ``P + O - 1 - first_row`` (the last output token excluded)."""
        return self.num_prompt_tokens + self.num_output_tokens - 1 - self.first_row

    def token_positions(self) -> np.ndarray:
        """``[N]`` int64 sequence positions of the rows: ``first_row ..`` for a whole record, or the routed
        positions of its CP share (``first_row <= t < first_row + num_routed_rows``) for a shard."""
        lo = self.first_row
        if self.cp_share is None:
            return np.arange(lo, lo + self.expert_ids.shape[0], dtype=np.int64)
        cp_size, cp_rank, pad_multiple = self.cp_share
        seq_len = self.num_prompt_tokens + self.num_output_tokens
        pos = cp_token_positions(seq_len, cp_size, cp_rank, pad_multiple)
        return pos[(pos >= lo) & (pos < lo + self.num_routed_rows)]

    @property
    def num_rows(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def nbytes(self) -> int:
        return int(self.expert_ids.nbytes)

    def with_last_row(self) -> RoutingRecord:
        """A copy with a synthetic row for the last output token (strided ids, offset = its position)."""
        if self.has_last_row:
            return self
        if self.cp_share is not None:
            raise ValueError("with_last_row: expected a whole record, got a CP shard")
        n, num_layers, k = self.expert_ids.shape
        last = strided_fill(1, num_layers, k, self.num_experts, offset=self.first_row + n)
        return RoutingRecord(sample_id=self.sample_id, expert_ids=np.concatenate([self.expert_ids, last]),
                             num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self.num_output_tokens,
                             moe_layers=self.moe_layers, num_experts=self.num_experts, first_row=self.first_row,
                             has_last_row=True)

    def to_int64(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[N, L_moe, K]`` int64 torch tensor (a new buffer), the index dtype megatron's router gathers with."""
        return torch.from_numpy(self.expert_ids.astype(np.int64)).to(device)

    def per_layer_int64(self, device: torch.device | str | None = None) -> list[torch.Tensor]:
        """One ``[N, K]`` int64 tensor per MoE layer, in model order (``RouterReplay.set_replay_data`` layout
        for a single sample on a single rank; packing, CP and SP slicing are the caller's job)."""
        ids = self.to_int64(device)
        return [ids[:, i, :].contiguous() for i in range(ids.shape[1])]
