"""The single pass's chunk plan (`fused_lm_head_loss`): which whole sequences share a chunk of logits, and which
over-long sequence goes through the recomputing head's tiles. Host integers only, no torch, so the memory planner
(`vespo_megatron.planning`, which runs without torch) plans with the head's own defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS", "WHOLE_SEQUENCE_CAP_ELEMENTS", "default_whole_sequence_elements",
           "plan_sequence_chunks", "plan_head_chunks"]

# The single pass's chunk: 2**29.25 logits (~0.59 Gi elements, 1.19 GiB in bf16), two 2048-token sequences of
# Qwen3's 151936-token vocabulary. Fewer chunks than the recomputing head's 2**29 tiles where sequences are short
# (at 16k tokens of 2048: 4 chunks instead of 8; on a V/4 shard 1 instead of 2), which is what kept the single
# pass within 1.35x of the GEMM floor at every bench shape on four H100 calls (bench/README.md, rounds 11, 12 and 15;
# 2**29 went to 1.41x at 16k tokens on V/4 in round 15), at <= 2.45 GiB extra at 32k tokens either way.
DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS = int(2**29.25)
# A sequence over the chunk is held whole up to twice the chunk, but (unless the chunk itself is larger) never
# above 2**30 logits, 2 GiB in bf16: 7,067 tokens of Qwen3's vocabulary at TP = 1.
WHOLE_SEQUENCE_CAP_ELEMENTS = 1 << 30


def default_whole_sequence_elements(chunk_elements: int) -> int:
    """whole_sequence_elements when None: twice the chunk, capped at 2**30 logits but never below the chunk."""
    return max(chunk_elements, min(2 * chunk_elements, WHOLE_SEQUENCE_CAP_ELEMENTS))


def plan_sequence_chunks(seq_tokens: Sequence[int], max_tokens: int) -> list[tuple[int, int]]:
    """Consecutive sequences grouped into chunks of at most `max_tokens` tokens: [(seq_start, seq_end)].
    A sequence longer than `max_tokens` is a chunk of its own; sequences without tokens join their neighbour."""
    if max_tokens < 1:
        raise ValueError(f"plan_sequence_chunks: max_tokens must be >= 1, got {max_tokens}")
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, n in enumerate(seq_tokens):
        if n < 0:
            raise ValueError(f"plan_sequence_chunks: seq_tokens[{i}] must be >= 0, got {n}")
        if used and used + n > max_tokens:
            chunks.append((start, i))
            start, used = i, 0
        used += n
    if len(seq_tokens) > start:
        chunks.append((start, len(seq_tokens)))
    return chunks


def plan_head_chunks(seq_tokens: Sequence[int], v_local: int, chunk_elements: int | None = None,
                     whole_sequence_elements: int | None = None) -> tuple[list[tuple[int, int]], tuple[bool, ...]]:
    """The single pass's plan for a shard of `v_local` vocabulary rows: the chunks of whole sequences
    (`plan_sequence_chunks` at chunk_elements / v_local tokens) and, per chunk, whether it goes through the
    recomputing tiles: one sequence whose logits exceed whole_sequence_elements (None:
    `default_whole_sequence_elements`). chunk_elements None: DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS."""
    elements = DEFAULT_SINGLE_PASS_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
    whole = default_whole_sequence_elements(elements) if whole_sequence_elements is None else whole_sequence_elements
    if not isinstance(whole, int) or isinstance(whole, bool) or whole < elements:
        raise ValueError(f"whole_sequence_elements: expected an int >= chunk_elements ({elements}) or None, "
                         f"got {whole_sequence_elements!r}")
    budget = max(1, elements // v_local)
    plan = plan_sequence_chunks(seq_tokens, budget)
    # a chunk over the budget is one sequence longer than it (plus empty ones): held whole up to `whole`
    # elements, otherwise its logits are never held whole
    return plan, tuple(sum(seq_tokens[a:b]) > max(budget, whole // v_local) for a, b in plan)
