"""Prompt datasets from JSONL or Parquet files (DAPO-Math-17k, verl-style rows, plain `{"prompt", "answer"}`).

Every row becomes a `PromptRecord`: the rendered prompt text, its token ids (through the tokenizer's chat
template when it has one), the gold answer string and the row's index in the file. Real datasets have bad
rows; each one is either skipped and counted per reason in `PromptDataset.skipped`, or rejected with an
error naming the row, per the config, so nothing disappears silently and a run's logs say how much data it
really trained on.

Batches are a pure function of (seed, split, step, count): index `step * count + i` walks a seeded
permutation of the training rows, a fresh permutation each epoch, so a resumed run sees exactly the prompts
an uninterrupted one would. `eval_count` rows, chosen by a seeded draw, are held out for evaluation.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespo_megatron.base.validation import ConfigError

__all__ = ["PromptDataConfig", "PromptRecord", "PromptDataset", "iter_rows", "SPLITS"]

SPLITS = ("train", "sft", "eval")  # "sft" draws training rows in its own order (the trainer's warm start)
_MISSING = object()



@dataclass(frozen=True, kw_only=True)
class PromptDataConfig:
    """`prompt_key`/`answer_key` may be dotted (`reward_model.ground_truth`). The prompt is a string or a
    list of chat messages. `prompt_template` wraps the (last) user message; it must contain `{prompt}`
    (substituted literally, so LaTeX braces such as `\\boxed{}` need no escaping). `system_prompt` is
    prepended when a row has no system message of its own."""

    path: str | Path
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    system_prompt: str | None = None
    prompt_template: str | None = None
    apply_chat_template: bool = True
    max_prompt_tokens: int = 1024
    too_long: str = "skip"
    missing_answer: str = "skip"  # also the policy for a gold answer the task's check rejects (unparsable)
    empty_prompt: str = "skip"
    eval_count: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | Path) or Path(self.path).suffix not in (".jsonl", ".parquet"):
            raise ConfigError("PromptDataConfig", "path", "a .jsonl or .parquet file", self.path)
        for name in ("prompt_key", "answer_key"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value and all(value.split("."))):
                raise ConfigError("PromptDataConfig", name, "a non-empty key, dotted for nested fields", value)
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError("PromptDataConfig", "system_prompt", "a str or None", self.system_prompt)
        if self.prompt_template is not None and not (isinstance(self.prompt_template, str)
                                                     and "{prompt}" in self.prompt_template):
            raise ConfigError("PromptDataConfig", "prompt_template", "None or a str containing '{prompt}'", self.prompt_template)
        if not isinstance(self.apply_chat_template, bool):
            raise ConfigError("PromptDataConfig", "apply_chat_template", "a bool", self.apply_chat_template)
        if not (isinstance(self.max_prompt_tokens, int) and not isinstance(self.max_prompt_tokens, bool)
                and self.max_prompt_tokens >= 1):
            raise ConfigError("PromptDataConfig", "max_prompt_tokens", "an int >= 1", self.max_prompt_tokens)
        for name in ("too_long", "missing_answer", "empty_prompt"):
            if getattr(self, name) not in ("skip", "error"):
                raise ConfigError("PromptDataConfig", name, "'skip' or 'error'", getattr(self, name))
        if not (isinstance(self.eval_count, int) and not isinstance(self.eval_count, bool)
                and self.eval_count >= 0):
            raise ConfigError("PromptDataConfig", "eval_count", "an int >= 0", self.eval_count)
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool)):
            raise ConfigError("PromptDataConfig", "seed", "an int", self.seed)


@dataclass(frozen=True)
class PromptRecord:
    row: int  # 0-based index of the data row in the file
    text: str  # the rendered prompt (chat template applied)
    answer: str
    prompt_ids: tuple[int, ...]


def iter_rows(path: str | Path, columns: list[str] | None = None) -> Iterator[tuple[int, dict, str]]:
    """(row index, row, location for messages) for each row of a .jsonl or .parquet file. Blank JSONL lines
    are not rows; a line that is not a JSON object is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PromptDataConfig.path: no such file {str(path)!r}")
    if path.suffix == ".jsonl":
        row = 0
        # Read bytes and decode line by line: a bad byte then names its line, not a buffer offset.
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is not data
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: expected UTF-8 text, got byte 0x{raw[e.start]:02x} at "
                                     f"column {e.start + 1}") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})"
                                     ) from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                yield row, obj, f"{path}:{lineno} (row {row})"
                row += 1
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            available = pq.read_schema(path).names
            if columns is not None:
                absent = [c for c in columns if c not in available]
                if absent:
                    raise ValueError(f"{path}: no column(s) {absent}; the file has {available}")
            table = pq.read_table(path, columns=columns)
            rows = table.to_pylist()
        except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, unreadable: name the file
            raise ValueError(f"{path}: expected a readable Parquet file, got {type(e).__name__}: {e}") from None
        for row, obj in enumerate(rows):
            yield row, obj, f"{path} (row {row})"


def _lookup(row: dict, key: str) -> Any:
    """`row[key]`, or the nested value for a dotted key; `_MISSING` when any level is absent."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


class PromptDataset:
    """Loads, renders, tokenizes and filters all rows up front (17k rows take seconds), then serves batches.

    `skipped` counts rows dropped per reason ("missing_answer", "gold_unparsable", "empty_prompt",
    "prompt_too_long"); `train` and `eval` are the kept records, `eval` holding `cfg.eval_count` of them chosen
    by a draw seeded with `cfg.seed`. `answer_check(answer)` (optional, e.g. the math task's cheap gold-answer
    check) returns None for a usable answer, else why not; such rows count as "gold_unparsable"."""

    def __init__(self, cfg: PromptDataConfig, tokenizer, *, answer_check: Callable[[str], str | None] | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.answer_check = answer_check
        self.use_chat_template = cfg.apply_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.skipped: Counter[str] = Counter()
        top = sorted({cfg.prompt_key.split(".")[0], cfg.answer_key.split(".")[0]})
        records = []
        for row, obj, where in iter_rows(cfg.path, columns=top):
            record = self._record(row, obj, where)
            if record is not None:
                records.append(record)
        if not records:
            raise ValueError(f"{cfg.path}: no usable rows (skipped: {dict(self.skipped) or 'none'}; the file "
                             f"has no rows or every row was filtered)")
        if cfg.eval_count >= len(records):
            raise ConfigError("PromptDataConfig", "eval_count", f"fewer than the {len(records)} usable rows (at least one must stay for"
                                     f" training)", cfg.eval_count)
        held = set(random.Random(f"{cfg.seed}/eval-rows").sample(range(len(records)), cfg.eval_count))
        self.eval = tuple(r for i, r in enumerate(records) if i in held)
        self.train = tuple(r for i, r in enumerate(records) if i not in held)
        self._perms: dict[tuple[str, int], list[int]] = {}

    # --- loading -------------------------------------------------------------------------------------------

    def _messages(self, prompt: Any, where: str) -> list[dict[str, str]] | None:
        """The chat messages of a row's prompt; None for an empty prompt (no text in any message)."""
        key = self.cfg.prompt_key
        if prompt is None or prompt == []:
            return None
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in prompt):
            messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        else:
            raise ValueError(f"{where}: field {key!r}: expected a non-empty string or a list of "
                             f"{{'role': str, 'content': str}} messages, got {prompt!r:.200}")
        if not any(m["content"].strip() for m in messages):
            return None
        if self.cfg.prompt_template is not None:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise ValueError(f"{where}: field {key!r}: prompt_template needs a user message, got roles "
                                 f"{[m['role'] for m in messages]}")
            last = messages[users[-1]]
            last["content"] = self.cfg.prompt_template.replace("{prompt}", last["content"])
        if self.cfg.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return messages

    def _render(self, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
        tok = self.tokenizer
        if self.use_chat_template:
            # What `apply_chat_template(..., tokenize=True)` does inside: render, then encode without special
            # tokens (the template writes them). Rendering once gives both the text and the ids.
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return text, list(tok.encode(text, add_special_tokens=False))
        text = "\n\n".join(m["content"] for m in messages)
        return text, list(tok.encode(text))

    def _skip_or_raise(self, policy: str, reason: str, message: str) -> None:
        if policy == "error":
            raise ValueError(message)
        self.skipped[reason] += 1

    def _record(self, row: int, obj: dict, where: str) -> PromptRecord | None:
        cfg = self.cfg
        prompt = _lookup(obj, cfg.prompt_key)
        if prompt is _MISSING:
            raise ValueError(f"{where}: field {cfg.prompt_key!r}: expected a prompt, got no such field "
                             f"(keys: {sorted(obj)})")
        answer = _lookup(obj, cfg.answer_key)
        if isinstance(answer, int | float) and not isinstance(answer, bool):
            answer = str(answer)
        if not (isinstance(answer, str) and answer.strip()):
            got = "no such field" if answer is _MISSING else repr(answer)
            self._skip_or_raise(cfg.missing_answer, "missing_answer", f"{where}: field {cfg.answer_key!r}: "
                                f"expected a non-empty answer (str or number), got {got:.200}")
            return None
        problem = self.answer_check(answer.strip()) if self.answer_check is not None else None
        if problem is not None:
            self._skip_or_raise(cfg.missing_answer, "gold_unparsable", f"{where}: field {cfg.answer_key!r}: "
                                f"expected a gold answer the reward can parse, got {answer!r:.200} ({problem})")
            return None
        messages = self._messages(prompt, where)
        if messages is None:
            self._skip_or_raise(cfg.empty_prompt, "empty_prompt", f"{where}: field {cfg.prompt_key!r}: "
                                f"expected a non-empty prompt, got {prompt!r:.200}")
            return None
        try:
            text, ids = self._render(messages)
        except Exception as e:  # a template or tokenizer failure on one row's content: name the row
            raise ValueError(f"{where}: field {cfg.prompt_key!r}: the tokenizer could not render this prompt "
                             f"({type(e).__name__}: {e})") from e
        if len(ids) > cfg.max_prompt_tokens:
            self._skip_or_raise(cfg.too_long, "prompt_too_long", f"{where}: field {cfg.prompt_key!r}: "
                                f"expected at most max_prompt_tokens={cfg.max_prompt_tokens} tokens, "
                                f"got {len(ids)}")
            return None
        return PromptRecord(row=row, text=text, answer=answer.strip(), prompt_ids=tuple(ids))

    # --- batches -------------------------------------------------------------------------------------------

    def records(self, split: str) -> tuple[PromptRecord, ...]:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if split == "eval" and not self.eval:
            raise ValueError("split 'eval': the dataset holds no eval rows "
                             "(PromptDataConfig.eval_count is 0)")
        return self.eval if split == "eval" else self.train

    def _perm(self, split: str, epoch: int, n: int) -> list[int]:
        key = (split, epoch)
        if key not in self._perms:
            if len(self._perms) >= 8:
                self._perms.clear()
            perm = list(range(n))
            random.Random(f"{self.cfg.seed}/{split}/{epoch}").shuffle(perm)
            self._perms[key] = perm
        return self._perms[key]

    def batch(self, step: int, count: int, split: str = "train") -> list[PromptRecord]:
        """`count` records for `step`: positions `step*count ... step*count+count-1` of the split's stream.
        Training splits walk a new seeded permutation each epoch; "eval" walks the held-out rows in order."""
        if not (isinstance(step, int) and step >= 0 and isinstance(count, int) and count >= 1):
            raise ValueError(f"batch: expected step >= 0 and count >= 1, got step={step!r}, count={count!r}")
        pool = self.records(split)
        n = len(pool)
        out = []
        for g in range(step * count, (step + 1) * count):
            epoch, pos = divmod(g, n)
            out.append(pool[pos] if split == "eval" else pool[self._perm(split, epoch, n)[pos]])
        return out

    def __len__(self) -> int:
        return len(self.train) + len(self.eval)
