"""MathTask: the toy task's interface over a real prompt file, an HF tokenizer and the math-verify reward."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vespo_megatron.data.math_reward import MathRewardChecker, MathRewardConfig
from vespo_megatron.data.math_task import MathProblem, MathTask, MathTaskConfig
from vespo_megatron.data.prompts import PromptDataConfig
from vespo_megatron.data.testing_tokenizer import tiny_chat_tokenizer

SUFFIX = "\n\nPut your final answer within \\boxed{}."
ANSWERS = ["0.5", "4", "\\frac{3}{4}", "12", "x^2", "7", "100", "\\sqrt{2}", "9", "1"]


def rows():
    out = [{"prompt": f"Problem number {i}: compute the value.", "answer": a} for i, a in enumerate(ANSWERS)]
    out += [{"prompt": "No answer here."}, {"prompt": "Blank answer.", "answer": "  "},
            {"prompt": "A very long problem statement. " * 40, "answer": "3"}]
    return out


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def checker():
    with MathRewardChecker(MathRewardConfig(workers=2, timeout_s=10.0)) as c:
        yield c


@pytest.fixture(params=["jsonl", "parquet"])
def data_path(request, tmp_path):
    if request.param == "jsonl":
        path = tmp_path / "math.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    else:
        path = tmp_path / "math.parquet"
        pq.write_table(pa.Table.from_pylist(rows()), path)
    return path


def make_cfg(path, **data):
    data = {"prompt_template": "{prompt}" + SUFFIX, "max_prompt_tokens": 300, "eval_count": 3,
            "seed": 7} | data
    return MathTaskConfig(data=PromptDataConfig(path=path, **data), max_new_tokens=128, vocab_multiple=64)


def test_task_interface_counts_and_template(data_path, tok, checker):
    task = MathTask(make_cfg(data_path), tok, checker=checker)
    assert task.skipped == {"missing_answer": 2, "prompt_too_long": 1}
    assert len(task.dataset.train) == 7 and len(task.eval_problems()) == 3
    assert (task.max_prompt_tokens, task.max_new_tokens) == (300, 128)
    assert len(tok) == 265 and task.tok.vocab_size == 320
    assert task.tok.EOS == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id
    for p in task.problems(0, 7):
        assert isinstance(p, MathProblem) and p.answer == ANSWERS[p.row]
        expected = (f"<|im_start|>user\nProblem number {p.row}: compute the value.{SUFFIX}<|im_end|>\n"
                    "<|im_start|>assistant\n")
        assert tok.decode(list(p.prompt_ids)) == expected == p.text
        assert len(p.prompt_ids) <= task.max_prompt_tokens


def test_problems_are_deterministic_across_instances_and_eval_is_held_out(data_path, tok, checker):
    a = MathTask(make_cfg(data_path), tok, checker=checker)
    b = MathTask(make_cfg(data_path), tok, checker=checker)
    for step in (0, 1, 5, 17):
        assert a.problems(step, 4) == b.problems(step, 4)
        assert a.problems(step, 2, split="sft") == b.problems(step, 2, split="sft")
    assert a.eval_problems() == b.eval_problems()
    eval_rows = {p.row for p in a.eval_problems()}
    train_rows = {p.row for s in range(20) for p in a.problems(s, 4)}
    assert train_rows.isdisjoint(eval_rows) and len(train_rows | eval_rows) == len(ANSWERS)
    assert {p.row for p in a.problems(0, 3, split="eval")} == eval_rows
    other = MathTask(make_cfg(data_path, seed=8), tok, checker=checker)
    assert [p.row for s in range(3) for p in other.problems(s, 4)] != \
        [p.row for s in range(3) for p in a.problems(s, 4)]


def test_rewards_for_decoded_outputs(data_path, tok, checker):
    task = MathTask(make_cfg(data_path, eval_count=0), tok, checker=checker)
    by_row = {p.row: p for p in task.problems(0, len(ANSWERS))}  # one epoch: every row
    half, three_quarters = by_row[0], by_row[2]  # gold "0.5" and "\frac{3}{4}"
    eos = task.tok.EOS

    def out(text):
        return [*tok.encode(text, add_special_tokens=False), eos]

    task.stats.reset()
    assert task.reward(half, out("We get \\boxed{\\frac{1}{2}}")) == 1.0
    assert task.reward(half, out("We get \\boxed{\\frac{1}{3}}")) == 0.0
    results = task.score_many([half, three_quarters, three_quarters],
                              [out("so \\boxed{1/2}"), out("\\boxed{0.75}"), out("I give up")])
    assert [(r.reward, r.reason) for r in results] == [(1.0, "correct"), (1.0, "correct"), (0.0, "no_answer")]
    assert task.stats.counts() == {"correct": 3, "wrong": 1, "no_answer": 1}
    # the SFT target decodes to the boxed gold answer and earns the reward
    for p in by_row.values():
        ids = task.answer_ids(p)
        assert ids[-1] == eos and tok.decode(list(ids[:-1])) == f"\\boxed{{{p.answer}}}"
        assert task.reward(p, ids) == 1.0
    with pytest.raises(ValueError, match=r"expected as many outputs as problems \(2\), got 1"):
        task.score_many([half, half], [out("x")])


def test_task_owns_its_checker_and_validates_config(tmp_path, tok):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n", encoding="utf-8")
    cfg = MathTaskConfig(data=PromptDataConfig(path=path), reward=MathRewardConfig(workers=1),
                         vocab_multiple=7, eos_token="<|endoftext|>")
    task = MathTask(cfg, tok)
    assert task.tok.vocab_size == 266 and task.tok.EOS == tok.convert_tokens_to_ids("<|endoftext|>")
    (p,) = task.problems(3, 1)
    assert task.reward(p, tok.encode("\\boxed{2}", add_special_tokens=False)) == 1.0
    task.close()
    with pytest.raises(RuntimeError, match="used after close"):
        task.reward(p, [])
    with pytest.raises(ValueError, match=r"MathTaskConfig\.max_new_tokens: expected an int >= 1, got 0"):
        MathTaskConfig(data=PromptDataConfig(path=path), max_new_tokens=0)
    with pytest.raises(ValueError, match=r"MathTaskConfig\.sft_answer_template: expected a str containing"):
        MathTaskConfig(data=PromptDataConfig(path=path), sft_answer_template="\\boxed{}")
    with pytest.raises(ValueError, match=r"MathTaskConfig\.eos_token: expected a token of the tokenizer"):
        MathTask(MathTaskConfig(data=PromptDataConfig(path=path), eos_token="<nope>"), tok)


def test_unparsable_gold_answers_are_counted_at_load_not_scored_wrong(tmp_path, tok):
    """Issue 13: `\\frac{{{` and `hello world` were scored "wrong"; now they are bad data, counted by reason."""
    path = tmp_path / "math.jsonl"
    data = [{"prompt": "p0", "answer": "1"}, {"prompt": "p1", "answer": "\\frac{{{"},
            {"prompt": "p2", "answer": "hello world"}, {"prompt": "", "answer": "2"}, {"prompt": "p4", "answer": "3"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    task = MathTask(MathTaskConfig(data=PromptDataConfig(path=path)), tok)
    assert task.skipped == {"gold_unparsable": 2, "empty_prompt": 1}
    assert [p.row for p in task.problems(0, 2)] in ([0, 4], [4, 0])
    task.close()
