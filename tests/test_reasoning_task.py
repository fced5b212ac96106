"""The scratchpad-addition task (issue 17's "task that needs length"): gold traces checked against Python's int
arithmetic by an independent parser, lengths per level, disjoint eval split, reward of gold / corrupted
answers, determinism, and its selection from the command line."""

import re
import zlib

import pytest

from vespo_megatron.training import cli as train_cli
from vespo_megatron.training.reasoning_task import ReasoningTask, ReasoningTaskConfig

COLUMN = re.compile(r"(\d)\+(\d)\+(\d)=(\d{1,2}),")


def _check_trace(text: str, prompt: str) -> None:
    """Independent of the task's code: re-derive every column from the prompt's operands with int math."""
    a_text, b_text = prompt.rstrip("=").split("+")
    a, b = int(a_text), int(b_text)
    body, answer = text.split("=>")
    columns = COLUMN.findall(body)
    assert "".join(m.group(0) for m in COLUMN.finditer(body)) == body  # nothing but columns
    assert len(columns) == len(a_text) == len(b_text)
    carry = 0
    for i, (x, y, c, s) in enumerate(columns):
        assert int(x) == a // 10**i % 10 and int(y) == b // 10**i % 10  # digit i of each operand
        assert int(c) == carry and int(s) == int(x) + int(y) + carry
        carry = int(s) // 10
    assert int(answer) == a + b and answer == str(a + b)


@pytest.fixture(scope="module")
def task():
    return ReasoningTask(ReasoningTaskConfig())


def test_gold_traces_are_correct_and_rewarded(task):
    problems = task.problems(0, 200) + task.eval_problems()[:50] + task.problems(3, 50, split="sft")
    for p in problems:
        ids = task.answer_ids(p)
        assert ids[-1] == task.tok.EOS and task.tok.EOS not in ids[:-1]
        _check_trace(task.tok.decode(ids), p.text)
        assert task.tok.decode(p.prompt_ids) == p.text and p.prompt_ids[0] == task.tok.BOS
        assert task.reward(p, ids) == 1.0
        assert len(p.prompt_ids) <= task.max_prompt_tokens and len(ids) <= task.max_answer_tokens


def test_reward_reads_only_the_final_answer(task):
    p = task.problems(1, 1)[0]
    gold = task.tok.decode(task.answer_ids(p))
    body, answer = gold.split("=>")

    def ids(text, eos=True):
        return (*task.tok.encode(text), *((task.tok.EOS,) if eos else ()))

    wrong = str(int(answer) + 1)
    assert task.reward(p, ids(body + "=>" + wrong)) == 0.0  # a corrupted answer
    assert task.reward(p, ids(body + "=>0" + answer)) == 0.0  # a leading zero is not the answer
    assert task.reward(p, ids(body + "=>" + answer, eos=False)) == 0.0  # cut off before <eos>
    assert task.reward(p, ids(body)) == 0.0  # no answer marker
    assert task.reward(p, ids("=>" + answer)) == 1.0  # the scratchpad is not graded
    assert task.reward(p, ids("1+1+0=2,=>" + wrong + "=>" + answer)) == 1.0  # the last marker counts
    assert task.reward(p, (*ids(body + "=>" + answer), *task.tok.encode("99"))) == 1.0  # after <eos>: ignored


def test_lengths_span_30_to_300_and_grow_with_difficulty(task):
    by_level: dict[int, list[int]] = {}
    for p in task.problems(0, 2000):
        by_level.setdefault(p.level, []).append(len(task.answer_ids(p)))
    levels = sorted(by_level)
    assert levels == list(task.cfg.level_list)  # every level is drawn
    assert min(by_level[levels[0]]) >= 30 and max(by_level[levels[-1]]) <= 300
    assert max(max(v) for v in by_level.values()) <= task.max_answer_tokens <= task.max_new_tokens
    for lo, hi in zip(levels, levels[1:], strict=False):  # strictly longer answers at each harder level
        assert max(by_level[lo]) < min(by_level[hi])
    counts = [len(by_level[d]) for d in levels]
    assert min(counts) > 2000 / len(levels) * 0.7  # uniform mixing by default


def test_level_weights_mix_the_levels():
    task = ReasoningTask(ReasoningTaskConfig(levels="3,5", level_weights="3,1"))
    levels = [p.level for p in task.problems(0, 4000)]
    assert 0.70 < levels.count(3) / len(levels) < 0.80
    only = ReasoningTask(ReasoningTaskConfig(levels="3,5", level_weights="0,1"))
    assert {p.level for p in only.problems(0, 50)} == {5}


def test_eval_split_is_disjoint_fixed_and_balanced(task):
    evals = task.eval_problems()
    assert len(evals) == task.cfg.eval_count
    assert [p.level for p in evals[:8]] == list(task.cfg.level_list)  # round-robin over levels
    eval_texts = {p.text for p in evals}
    assert all(zlib.crc32(t.encode()) % 16 == 0 for t in eval_texts)  # the held-out bucket
    train = {p.text for s in range(20) for split in ("train", "sft") for p in task.problems(s, 64, split=split)}
    assert not eval_texts & train
    assert all(zlib.crc32(t.encode()) % 16 != 0 for t in train)
    # the same held-out problems for every seed (comparisons over seeds), training problems differ
    other = ReasoningTask(ReasoningTaskConfig(seed=7))
    assert [p.text for p in other.eval_problems()] == [p.text for p in evals]
    assert [p.text for p in other.problems(0, 8)] != [p.text for p in task.problems(0, 8)]
    # a larger held-out set starts with the smaller one (a larger final eval keeps the runs' curves comparable)
    larger = ReasoningTask(ReasoningTaskConfig(eval_count=4 * task.cfg.eval_count)).eval_problems()
    assert [p.text for p in larger[: len(evals)]] == [p.text for p in evals]
    assert len({p.text for p in larger}) == len(larger)


def test_determinism(task):
    again = ReasoningTask(ReasoningTaskConfig())
    assert task.problems(5, 32) == again.problems(5, 32)
    assert task.problems(5, 32) != task.problems(6, 32)
    assert task.problems(5, 32, split="sft") != task.problems(5, 32)


@pytest.mark.parametrize("field,value", [("levels", ""), ("levels", "3,x"), ("levels", "0"), ("levels", "3,3"),
                                         ("level_weights", "1"), ("level_weights", "0,0"),
                                         ("eval_count", 0), ("length_slack", -1)])
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=f"ReasoningTaskConfig.{field}"):
        ReasoningTaskConfig(**{field: value})


def test_selected_from_the_command_line():
    cfg = train_cli.config_from_argv(["--task", "reasoning", "--levels", "3,4", "--seed", "2"])
    assert cfg.task == ReasoningTaskConfig(levels="3,4", seed=2)
    bed = train_cli.config_from_argv(["--base", "testbed", "--eval-count", "16"])
    assert bed.task == ReasoningTaskConfig(levels="3,4,5,6", eval_count=16) and bed.rollout.samples_per_step == 512
    assert bed.algorithm.clip_grad == 1.0 and 1e-6 <= bed.algorithm.lr <= 1e-5
    task = ReasoningTask(bed.task)
    assert bed.model.seq_length >= task.max_prompt_tokens + task.max_new_tokens
    assert 4 <= bed.model.num_layers <= 8 and 256 <= bed.model.hidden_size <= 512
    assert 8 <= bed.model.num_experts <= 16 and bed.model.moe_router_topk == 2
    with pytest.raises(train_cli.CLIError, match="--task"):
        train_cli.config_from_argv(["--task", "nope"])
