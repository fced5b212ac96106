"""A procedurally generated, verifiable task with variable-length answers: integer arithmetic.

Prompt `<bos>a+b=` (or `a-b=`, `a*b=`), answer the decimal digits of the result then `<eos>`. Answers have
1 to `max_answer_digits` characters, so responses differ in length. The reward is 1 for an exactly right
answer followed by `<eos>`, else 0. Prompts are a pure function of (seed, step, index): a resumed run sees
the same prompts as an uninterrupted one.

The tokenizer is character level: `<pad>`, `<bos>`, `<eos>`, digits, `+ - * =`; its vocabulary is padded to
a multiple of 64 so it splits evenly over tensor-parallel ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError

__all__ = ["CharTokenizer", "ArithmeticTaskConfig", "ArithmeticTask", "Problem"]


class CharTokenizer:
    PAD, BOS, EOS = 0, 1, 2
    CHARS = "0123456789+-*="

    def __init__(self, vocab_multiple: int = 64):
        self._to_id = {c: i + 3 for i, c in enumerate(self.CHARS)}
        self._to_char = {i: c for c, i in self._to_id.items()}
        self.vocab_size = -(-(len(self.CHARS) + 3) // vocab_multiple) * vocab_multiple

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError as e:
            raise ValueError(f"text: character {e.args[0]!r} is not in the tokenizer's alphabet {self.CHARS!r}") from None

    def decode(self, ids) -> str:
        special, to_char = (self.PAD, self.BOS, self.EOS), self._to_char
        return "".join([to_char.get(i, "?") for i in map(int, ids) if i not in special])


@dataclass(frozen=True, kw_only=True)
class ArithmeticTaskConfig:
    max_operand: int = 20
    ops: str = "+"
    seed: int = 0
    eval_count: int = 64  # held-out problems (split "eval")

    def __post_init__(self) -> None:
        if not (isinstance(self.max_operand, int) and 1 <= self.max_operand <= 10**6):
            raise ConfigError("ArithmeticTaskConfig", "max_operand", "an int in [1, 1e6]", self.max_operand)
        if not self.ops or any(op not in "+-*" for op in self.ops):
            raise ConfigError("ArithmeticTaskConfig", "ops", "a non-empty subset of '+-*'", self.ops)
        if not (isinstance(self.eval_count, int) and self.eval_count >= 1):
            raise ConfigError("ArithmeticTaskConfig", "eval_count", "an int >= 1", self.eval_count)


@dataclass(frozen=True)
class Problem:
    text: str  # e.g. "12+7="
    answer: str  # e.g. "19"
    prompt_ids: tuple[int, ...]


class ArithmeticTask:
    def __init__(self, cfg: ArithmeticTaskConfig, tokenizer: CharTokenizer | None = None):
        self.cfg = cfg
        self.tok = tokenizer or CharTokenizer()

    @property
    def max_answer_digits(self) -> int:
        m = self.cfg.max_operand
        largest = max(2 * m if "+" in self.cfg.ops else 0, m if "-" in self.cfg.ops else 0,
                      m * m if "*" in self.cfg.ops else 0)
        return len(str(largest)) + (1 if "-" in self.cfg.ops else 0)

    @property
    def max_prompt_tokens(self) -> int:
        return 1 + 2 * len(str(self.cfg.max_operand)) + 2  # <bos>, two operands, operator, "="

    @property
    def max_new_tokens(self) -> int:
        return self.max_answer_digits + 1  # digits and <eos>

    def problem(self, a: int, op: str, b: int) -> Problem:
        value = a + b if op == "+" else a - b if op == "-" else a * b
        text = f"{a}{op}{b}="
        return Problem(text=text, answer=str(value), prompt_ids=(self.tok.BOS, *self.tok.encode(text)))

    def problems(self, step: int, count: int, *, split: str = "train") -> list[Problem]:
        """`count` problems for `step`, a pure function of (seed, split, step)."""
        rng = random.Random(f"{self.cfg.seed}/{split}/{step}")
        out = []
        for _ in range(count):
            a, b = rng.randint(0, self.cfg.max_operand), rng.randint(0, self.cfg.max_operand)
            out.append(self.problem(a, rng.choice(self.cfg.ops), b))
        return out

    def eval_problems(self) -> list[Problem]:
        """The fixed held-out problems: `eval_count` of split "eval" (a seeded stream of its own)."""
        return self.problems(0, self.cfg.eval_count, split="eval")

    def answer_ids(self, problem: Problem) -> tuple[int, ...]:
        return (*self.tok.encode(problem.answer), self.tok.EOS)

    def reward(self, problem: Problem, output_ids) -> float:
        """1.0 iff the output is exactly the answer's digits followed by <eos>."""
        return 1.0 if tuple(int(i) for i in output_ids) == self.answer_ids(problem) else 0.0
