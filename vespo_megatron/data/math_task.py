"""A math task from a prompt dataset and a Hugging Face tokenizer, with the toy task's interface.

The trainer asks a task for `problems(step, count, split)`, `reward(problem, output_ids)`, `answer_ids`
(SFT warm start), `max_prompt_tokens`, `max_new_tokens` and `tok.vocab_size`/`tok.EOS`; `ArithmeticTask`
(training/toy_task.py) is the reference. Here the prompts come from `PromptDataset`, the reward from
`MathRewardChecker` (math-verify in time-limited worker processes), and `tok` adapts the HF tokenizer: its
vocabulary size is `len(tokenizer)` (added tokens included) rounded up to `vocab_multiple` so the embedding
splits evenly over tensor-parallel ranks. `stats` (reward reasons) and `skipped` (dataset rows dropped per
reason) are there for the trainer's logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vespo_megatron.base.validation import ConfigError, check_int

from .math_reward import MathRewardChecker, MathRewardConfig, RewardResult, RewardStats, gold_problem
from .prompts import PromptDataConfig, PromptDataset

__all__ = ["MathTaskConfig", "MathTask", "MathProblem", "HFTokenizerAdapter"]


@dataclass(frozen=True, kw_only=True)
class MathTaskConfig:
    """`eos_token` overrides the tokenizer's eos (e.g. "<|im_end|>" for a base tokenizer driven by a chat
    template). `sft_answer_template` renders the gold answer for the SFT warm start; `{answer}` is replaced
    literally."""

    data: PromptDataConfig
    reward: MathRewardConfig = field(default_factory=MathRewardConfig)
    max_new_tokens: int = 1024
    vocab_multiple: int = 64
    eos_token: str | None = None
    sft_answer_template: str = "\\boxed{{answer}}"

    def __post_init__(self) -> None:
        c = "MathTaskConfig"
        if not isinstance(self.data, PromptDataConfig):
            raise ConfigError(c, "data", "a PromptDataConfig", type(self.data).__name__)
        if not isinstance(self.reward, MathRewardConfig):
            raise ConfigError(c, "reward", "a MathRewardConfig", type(self.reward).__name__)
        for name in ("max_new_tokens", "vocab_multiple"):
            check_int(c, name, getattr(self, name), low=1)
        if self.eos_token is not None and not (isinstance(self.eos_token, str) and self.eos_token):
            raise ConfigError(c, "eos_token", "None or a token string", self.eos_token)
        if not (isinstance(self.sft_answer_template, str) and "{answer}" in self.sft_answer_template):
            raise ConfigError(c, "sft_answer_template", "a str containing '{answer}'", self.sft_answer_template)


@dataclass(frozen=True)
class MathProblem:
    text: str  # the rendered prompt
    answer: str  # the gold answer
    prompt_ids: tuple[int, ...]
    row: int  # the row in the data file


class HFTokenizerAdapter:
    """What the trainer needs of a tokenizer: `vocab_size` (padded), `EOS`, `PAD`, `encode`, `decode`."""

    def __init__(self, tokenizer, *, vocab_multiple: int = 64, eos_token: str | None = None):
        self.hf = tokenizer
        size = len(tokenizer)
        self.vocab_size = -(-size // vocab_multiple) * vocab_multiple
        if eos_token is not None:
            eos = tokenizer.convert_tokens_to_ids(eos_token)
            if eos is None or eos == getattr(tokenizer, "unk_token_id", None):
                raise ValueError(f"MathTaskConfig.eos_token: expected a token of the tokenizer, "
                                 f"got {eos_token!r}")
        else:
            eos = tokenizer.eos_token_id
            if eos is None:
                raise ValueError("MathTaskConfig.eos_token: expected a token when the tokenizer has no "
                                 "eos_token, got None")
        self.EOS = int(eos)
        pad = tokenizer.pad_token_id
        self.PAD = int(pad) if pad is not None else self.EOS

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)


class MathTask:
    """`checker` may be shared between tasks (one worker pool); by default the task starts its own, which
    `close()` stops."""

    def __init__(self, cfg: MathTaskConfig, tokenizer, *, checker: MathRewardChecker | None = None):
        self.cfg = cfg
        self.tok = HFTokenizerAdapter(tokenizer, vocab_multiple=cfg.vocab_multiple, eos_token=cfg.eos_token)
        # Gold answers the checker could never match are bad data, skipped and counted when the file loads.
        self.dataset = PromptDataset(cfg.data, tokenizer, answer_check=gold_problem)
        self._own_checker = checker is None
        self._checker = checker  # our own pool starts on first use: ranks that never score start none

    @property
    def max_prompt_tokens(self) -> int:
        return self.cfg.data.max_prompt_tokens

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    @property
    def checker(self) -> MathRewardChecker:
        if self._checker is None:
            self._checker = MathRewardChecker(self.cfg.reward)
        return self._checker

    @property
    def stats(self) -> RewardStats:
        return self.checker.stats

    @property
    def skipped(self) -> dict[str, int]:
        return dict(self.dataset.skipped)

    @staticmethod
    def _problem(record) -> MathProblem:
        return MathProblem(text=record.text, answer=record.answer, prompt_ids=record.prompt_ids,
                           row=record.row)

    def problems(self, step: int, count: int, *, split: str = "train") -> list[MathProblem]:
        """`count` problems for `step`, a pure function of (data seed, split, step, count)."""
        return [self._problem(r) for r in self.dataset.batch(step, count, split)]

    def eval_problems(self) -> list[MathProblem]:
        """The held-out rows (`PromptDataConfig.eval_count`), in file order."""
        return [self._problem(r) for r in self.dataset.records("eval")]

    def answer_ids(self, problem: MathProblem) -> tuple[int, ...]:
        text = self.cfg.sft_answer_template.replace("{answer}", problem.answer)
        return (*self.tok.encode(text), self.tok.EOS)

    def reward(self, problem: MathProblem, output_ids) -> float:
        return self.score_many([problem], [output_ids])[0].reward

    def score_many(self, problems: Sequence[MathProblem], outputs: Sequence) -> list[RewardResult]:
        """Checks a batch of responses (token ids) concurrently in the checker's workers."""
        if len(problems) != len(outputs):
            raise ValueError(f"score_many: expected as many outputs as problems ({len(problems)}), "
                             f"got {len(outputs)}")
        return self.checker.score_many((self.tok.decode(o), p.answer) for p, o in zip(problems, outputs,
                                                                                      strict=True))

    def close(self) -> None:
        if self._own_checker and self._checker is not None:
            self._checker.close()
