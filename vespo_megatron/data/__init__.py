"""Real prompt datasets (JSONL/Parquet) and a time-limited math answer reward, packaged as a trainer task.

`testing_tokenizer` (a tiny offline HF tokenizer for tests) is not imported here: it needs transformers."""

from .math_reward import (
    FAILURE_REASONS,
    REASONS,
    MathRewardChecker,
    MathRewardConfig,
    RewardResult,
    RewardStats,
    last_boxed,
    math_verify_check,
)
from .math_task import HFTokenizerAdapter, MathProblem, MathTask, MathTaskConfig
from .prompts import SPLITS, PromptDataConfig, PromptDataset, PromptRecord, iter_rows

__all__ = [
    "FAILURE_REASONS", "REASONS", "MathRewardChecker", "MathRewardConfig", "RewardResult", "RewardStats",
    "last_boxed", "math_verify_check",
    "HFTokenizerAdapter", "MathProblem", "MathTask", "MathTaskConfig",
    "SPLITS", "PromptDataConfig", "PromptDataset", "PromptRecord", "iter_rows",
]
