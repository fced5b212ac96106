"""A verifiable task that needs length: multi-digit addition written out column by column (a scratchpad).

Prompt `<bos>4821+3970=`; the answer works the columns from the least significant digit, each as
`digit+digit+carry=column sum,`, then `=>` and the sum, then `<eos>`:

    <bos>4821+3970=  1+0+0=1,2+7+0=9,8+9+0=17,4+3+1=8,=>8791<eos>

Both operands of a level-d problem have exactly d digits, so the answer has d columns of 8 or 9 tokens and
its length grows linearly with the difficulty: about 9.5 d + 3 tokens (d = 3: 30-34, d = 28: ~270-285; the
measured distribution is in docs/testbed.md). The reward reads only the text after the last `=>` (the
scratchpad is not graded): 1 iff it is exactly the sum's digits and the output ended with `<eos>`, else 0.
The scratchpad is still needed in practice: a small model cannot add 32-digit numbers in one step, and the
SFT traces teach it to carry column by column.

Difficulty: `levels` (digits per operand) mixed by `level_weights` (uniform when empty). Splits: every
problem belongs to one bucket, crc32(prompt text) mod 16; bucket 0 is the held-out eval split, every other
split ("train", "sft") only draws problems outside it, so eval and training problems are disjoint by
construction. Problems are a pure function of (seed, split, step): a resumed run sees the same ones. The
eval split does not depend on the seed: every run of a sweep (and the SFT base) is scored on the same
held-out problems, so the spread over seeds is the training's alone.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError, check_int

from .toy_task import CharTokenizer

__all__ = ["ScratchpadTokenizer", "ReasoningTaskConfig", "ReasoningTask", "ReasoningProblem", "EVAL_BUCKETS",
           "ANSWER_MARKER"]

EVAL_BUCKETS = 16  # 1 / EVAL_BUCKETS of all problems (those with crc32(text) % 16 == 0) are held out
ANSWER_MARKER = "=>"


class ScratchpadTokenizer(CharTokenizer):
    """Characters of the traces: digits, `+ = , >`; `<pad> <bos> <eos>`; vocabulary padded to 64."""

    CHARS = "0123456789+=,>"


def _parse_ints(text: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(t) for t in text.split(",")) if text.strip() else ()
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class ReasoningTaskConfig:
    """levels: comma-separated digits per operand, e.g. "4,8,16"; level_weights: their mixing weights
    ("" = uniform); eval_count: held-out problems, spread round-robin over the levels; length_slack: tokens
    allowed beyond the longest gold answer before generation is cut (max_new_tokens)."""

    levels: str = "3,6,9,12,16,20,24,28"
    level_weights: str = ""
    seed: int = 0
    eval_count: int = 96
    length_slack: int = 16

    def __post_init__(self) -> None:
        c = "ReasoningTaskConfig"
        levels = _parse_ints(self.levels) if isinstance(self.levels, str) else None
        if not levels or any(not 1 <= d <= 64 for d in levels) or len(set(levels)) != len(levels):
            raise ConfigError(c, "levels", "comma-separated distinct digit counts in [1, 64], e.g. '4,8,16'",
                              self.levels)
        weights = _parse_ints(self.level_weights) if isinstance(self.level_weights, str) else None
        if weights is None or weights and (len(weights) != len(levels) or any(w < 0 for w in weights)
                                           or not sum(weights)):
            raise ConfigError(c, "level_weights", f"'' (uniform) or {len(levels)} comma-separated ints >= 0, "
                              "not all 0", self.level_weights)
        check_int(c, "seed", self.seed)
        check_int(c, "eval_count", self.eval_count, low=1)
        check_int(c, "length_slack", self.length_slack, low=0)

    @property
    def level_list(self) -> tuple[int, ...]:
        return _parse_ints(self.levels)

    @property
    def weight_list(self) -> tuple[int, ...]:
        return _parse_ints(self.level_weights) or (1,) * len(self.level_list)


@dataclass(frozen=True)
class ReasoningProblem:
    text: str  # the prompt text, e.g. "4821+3970="
    answer: str  # the sum's digits, e.g. "8791"
    prompt_ids: tuple[int, ...]
    level: int  # digits per operand
    operands: tuple[int, int]


def scratchpad(a: int, b: int, digits: int) -> str:
    """The gold trace: one `x+y+c=s,` per column from the least significant one, then `=>` and the sum."""
    xs, ys = str(a).zfill(digits)[::-1], str(b).zfill(digits)[::-1]
    parts, carry = [], 0
    for x, y in zip(xs, ys, strict=True):
        s = int(x) + int(y) + carry
        parts.append(f"{x}+{y}+{carry}={s},")
        carry = s // 10
    return "".join(parts) + ANSWER_MARKER + str(a + b)


class ReasoningTask:
    def __init__(self, cfg: ReasoningTaskConfig, tokenizer: ScratchpadTokenizer | None = None):
        self.cfg = cfg
        self.tok = tokenizer or ScratchpadTokenizer()

    @staticmethod
    def bucket(text: str) -> int:
        return zlib.crc32(text.encode()) % EVAL_BUCKETS  # stable across processes (str hash() is salted)

    @property
    def max_prompt_tokens(self) -> int:
        return 1 + 2 * max(self.cfg.level_list) + 2  # <bos>, two operands, "+", "="

    @property
    def max_answer_tokens(self) -> int:
        """The longest gold answer (with <eos>): every column carries, the sum has d + 1 digits."""
        d = max(self.cfg.level_list)
        return 9 * d + len(ANSWER_MARKER) + d + 1 + 1  # columns "9+9+1=19," are 9 tokens

    @property
    def max_new_tokens(self) -> int:
        return self.max_answer_tokens + self.cfg.length_slack

    def problem(self, a: int, b: int, digits: int) -> ReasoningProblem:
        text = f"{a}+{b}="
        return ReasoningProblem(text=text, answer=str(a + b), prompt_ids=(self.tok.BOS, *self.tok.encode(text)),
                                level=digits, operands=(a, b))

    def _draw(self, rng: random.Random, digits: int, held_out: bool) -> ReasoningProblem:
        low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
        while True:  # rejection: keep only problems of the wanted side of the eval bucket
            p = self.problem(rng.randint(low, high), rng.randint(low, high), digits)
            if (self.bucket(p.text) == 0) == held_out:
                return p

    def problems(self, step: int, count: int, *, split: str = "train") -> list[ReasoningProblem]:
        """`count` problems for `step`, a pure function of (seed, split, step); levels drawn by weight.
        Split "eval" draws held-out problems; any other split draws outside the held-out bucket."""
        seed = "eval" if split == "eval" else self.cfg.seed
        rng = random.Random(f"reasoning/{seed}/{split}/{step}")
        levels, weights = self.cfg.level_list, self.cfg.weight_list
        return [self._draw(rng, rng.choices(levels, weights)[0], split == "eval") for _ in range(count)]

    def eval_problems(self) -> list[ReasoningProblem]:
        """The fixed held-out problems: `eval_count`, level i % len(levels) for the i-th (every level alike)."""
        rng = random.Random("reasoning/eval")
        levels = self.cfg.level_list
        return [self._draw(rng, levels[i % len(levels)], True) for i in range(self.cfg.eval_count)]

    def trace(self, problem: ReasoningProblem) -> str:
        return scratchpad(*problem.operands, problem.level)

    def answer_ids(self, problem: ReasoningProblem) -> tuple[int, ...]:
        """The SFT target: the scratchpad, the answer, <eos>."""
        return (*self.tok.encode(self.trace(problem)), self.tok.EOS)

    def final_answer(self, output_ids) -> str | None:
        """The text after the last `=>` of an output that ended with <eos>; None if it did not."""
        ids = list(map(int, output_ids))
        if self.tok.EOS not in ids:
            return None  # cut at max_new_tokens
        text = self.tok.decode(ids[: ids.index(self.tok.EOS)])
        return text.rsplit(ANSWER_MARKER, 1)[1] if ANSWER_MARKER in text else None

    def reward(self, problem: ReasoningProblem, output_ids) -> float:
        """1.0 iff the final answer is exactly the sum's digits (no leading zeros), else 0.0."""
        return 1.0 if self.final_answer(output_ids) == problem.answer else 0.0
