"""PromptDataset: JSONL/Parquet loading, chat-template rendering, counted or fatal bad rows, and batches that
are a pure function of (seed, split, step)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vespo_megatron.data.prompts import PromptDataConfig, PromptDataset
from vespo_megatron.data.testing_tokenizer import tiny_chat_tokenizer

TEMPLATE = "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def qwen_render(messages):
    """The chat format written out by hand, independently of the tokenizer's Jinja template."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
        "<|im_start|>assistant\n"


ROWS = [
    {"prompt": "What is 1/2 + 1/2?", "answer": "1"},
    {"prompt": "Compute 2+2.", "answer": ""},  # empty answer
    {"prompt": "Compute 3+3.", "answer": None},  # null answer
    {"prompt": "Compute 4+4."},  # no answer key
    {"prompt": "x " * 300, "answer": "7"},  # too long
    {"prompt": "Find $\\frac{3}{6}$ in lowest terms.", "answer": "\\frac{1}{2}"},
    {"prompt": "How many primes are below 10?", "answer": 4},  # numbers become strings
]


def test_config_validation_names_field_expected_and_got(tmp_path):
    with pytest.raises(ValueError, match=r"PromptDataConfig\.path: expected a \.jsonl or \.parquet file, "
                                         r"got .*\.csv"):
        PromptDataConfig(path=tmp_path / "d.csv")
    with pytest.raises(ValueError, match=r"PromptDataConfig\.prompt_template: expected .*'\{prompt\}', "
                                         r"got 'Q: x'"):
        PromptDataConfig(path="d.jsonl", prompt_template="Q: x")
    with pytest.raises(ValueError, match=r"PromptDataConfig\.too_long: expected 'skip' or 'error', "
                                         r"got 'drop'"):
        PromptDataConfig(path="d.jsonl", too_long="drop")
    with pytest.raises(ValueError, match=r"PromptDataConfig\.max_prompt_tokens: expected an int >= 1, got 0"):
        PromptDataConfig(path="d.jsonl", max_prompt_tokens=0)
    with pytest.raises(ValueError, match=r"PromptDataConfig\.answer_key: .* got 'a\.\.b'"):
        PromptDataConfig(path="d.jsonl", answer_key="a..b")
    with pytest.raises(ValueError, match=r"PromptDataConfig\.eval_count: expected an int >= 0, got -1"):
        PromptDataConfig(path="d.jsonl", eval_count=-1)


def test_jsonl_skips_are_counted_and_prompts_rendered_with_the_chat_template(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    ds = PromptDataset(PromptDataConfig(path=path, prompt_template=TEMPLATE, system_prompt="You are a tutor.",
                                        max_prompt_tokens=200), tok)
    assert dict(ds.skipped) == {"missing_answer": 3, "prompt_too_long": 1}
    assert [r.row for r in ds.train] == [0, 5, 6]
    assert [r.answer for r in ds.train] == ["1", "\\frac{1}{2}", "4"]
    for r in ds.train:
        user = ROWS[r.row]["prompt"] + "\n\nPlease reason step by step, and put your final answer within " \
            "\\boxed{}."
        messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": user}]
        expected = qwen_render(messages)
        assert r.text == expected
        assert tok.decode(list(r.prompt_ids)) == expected
        assert list(r.prompt_ids) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                             tokenize=True, return_dict=False)
        assert r.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_error_policies_name_row_field_and_values(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(ValueError, match=r"d\.jsonl:2 \(row 1\): field 'answer': expected a non-empty "
                                         r"answer.*got ''"):
        PromptDataset(PromptDataConfig(path=path, missing_answer="error"), tok)
    good = write_jsonl(tmp_path / "g.jsonl", [ROWS[0], ROWS[4]])
    with pytest.raises(ValueError, match=r"g\.jsonl:2 \(row 1\): field 'prompt': expected at most "
                                         r"max_prompt_tokens=50 tokens, got \d{3}"):
        PromptDataset(PromptDataConfig(path=good, max_prompt_tokens=50, too_long="error"), tok)


def test_malformed_lines_and_prompts_are_errors(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed JSON"):
        PromptDataset(PromptDataConfig(path=bad), tok)
    arr = write_jsonl(tmp_path / "arr.jsonl", [[1, 2]])
    with pytest.raises(ValueError, match=r"arr\.jsonl:1: expected a JSON object, got list"):
        PromptDataset(PromptDataConfig(path=arr), tok)
    noprompt = write_jsonl(tmp_path / "np.jsonl", [{"question": "a", "answer": "1"}])
    with pytest.raises(ValueError, match=r"row 0\): field 'prompt': expected a prompt, got no such field"):
        PromptDataset(PromptDataConfig(path=noprompt), tok)
    badmsg = write_jsonl(tmp_path / "bm.jsonl", [{"prompt": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ValueError, match=r"field 'prompt': expected a non-empty string or a list"):
        PromptDataset(PromptDataConfig(path=badmsg), tok)
    with pytest.raises(FileNotFoundError, match="no such file"):
        PromptDataset(PromptDataConfig(path=tmp_path / "absent.jsonl"), tok)


def test_empty_after_filtering_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[1:4])
    with pytest.raises(ValueError, match=r"no usable rows \(skipped: \{'missing_answer': 3\}"):
        PromptDataset(PromptDataConfig(path=path), tok)
    empty = tmp_path / "e.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no usable rows"):
        PromptDataset(PromptDataConfig(path=empty), tok)


def test_parquet_verl_style_rows_with_message_lists_and_dotted_answer_key(tmp_path, tok):
    rows = [
        {"data_source": "math", "prompt": [{"role": "user", "content": "Solve 1+1. Answer: $Answer"}],
         "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"data_source": "math", "prompt": [{"role": "system", "content": "Be terse."},
                                           {"role": "user", "content": "Solve 2+3."}],
         "reward_model": {"ground_truth": "5", "style": "rule"}},
        {"data_source": "math", "prompt": [{"role": "user", "content": "Solve 0/0."}],
         "reward_model": {"ground_truth": None, "style": "rule"}},
    ]
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    ds = PromptDataset(PromptDataConfig(path=path, answer_key="reward_model.ground_truth",
                                        system_prompt="Default system."), tok)
    assert dict(ds.skipped) == {"missing_answer": 1}
    assert [(r.row, r.answer) for r in ds.train] == [(0, "2"), (1, "5")]
    assert ds.train[0].text == qwen_render([{"role": "system", "content": "Default system."},
                                            {"role": "user", "content": "Solve 1+1. Answer: $Answer"}])
    # a row with its own system message keeps it
    assert ds.train[1].text == qwen_render(rows[1]["prompt"])
    with pytest.raises(ValueError, match=r"dapo\.parquet: no column\(s\) \['solution'\]; the file has"):
        PromptDataset(PromptDataConfig(path=path, answer_key="solution"), tok)


def test_without_chat_template_prompts_are_plain_encoded(tmp_path):
    plain = tiny_chat_tokenizer(chat_template=False)
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0]])
    for cfg in (PromptDataConfig(path=path, system_prompt="Sys."),
                PromptDataConfig(path=path, system_prompt="Sys.", apply_chat_template=False)):
        tok = plain if cfg.apply_chat_template else tiny_chat_tokenizer()
        (r,) = PromptDataset(cfg, tok).train
        assert r.text == "Sys.\n\nWhat is 1/2 + 1/2?"
        assert tok.decode(list(r.prompt_ids)) == r.text


def test_batches_are_a_pure_function_of_seed_split_and_step(tmp_path, tok):
    rows = [{"prompt": f"Problem {i}", "answer": str(i)} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = PromptDataset(PromptDataConfig(path=path, eval_count=5, seed=3), tok)
    b = PromptDataset(PromptDataConfig(path=path, eval_count=5, seed=3), tok)
    c = PromptDataset(PromptDataConfig(path=path, eval_count=5, seed=4), tok)
    assert len(a.train) == 15 and len(a.eval) == 5
    assert {r.row for r in a.train}.isdisjoint(r.row for r in a.eval)
    assert [r.row for r in a.eval] == sorted(r.row for r in a.eval) == [r.row for r in b.eval]
    steps = [[r.row for r in a.batch(s, 4)] for s in range(8)]
    # the order of the calls does not matter
    assert steps == [[r.row for r in b.batch(s, 4)] for s in reversed(range(8))][::-1]
    assert steps != [[r.row for r in c.batch(s, 4)] for s in range(8)]
    flat = [row for s in steps for row in s]
    epoch0, epoch1 = flat[:15], flat[15:30]
    assert sorted(epoch0) == sorted(epoch1) == sorted(r.row for r in a.train)  # every row once per epoch
    assert epoch0 != epoch1  # a new permutation each epoch
    assert [r.row for r in a.batch(1, 3, "eval")] == [r.row for r in a.eval][3:] + [a.eval[0].row]
    sft = [r.row for r in a.batch(0, 15, "sft")]
    assert sft != epoch0 and sorted(sft) == sorted(epoch0)
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'sft', 'eval'\), got 'test'"):
        a.batch(0, 1, "test")
    with pytest.raises(ValueError, match=r"PromptDataConfig\.eval_count: expected fewer than the 20 usable "
                                         r"rows"):
        PromptDataset(PromptDataConfig(path=path, eval_count=20), tok)
    with pytest.raises(ValueError, match="no eval rows"):
        PromptDataset(PromptDataConfig(path=path), tok).batch(0, 1, "eval")


def test_undecodable_bytes_and_non_parquet_files_name_the_file_and_line(tmp_path, tok):
    """Issue 13: a bad byte gave a bare UnicodeDecodeError at a buffer offset; a non-Parquet .parquet an
    ArrowInvalid without the path."""
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: expected UTF-8 text, got byte 0xe9 at column 16"):
        PromptDataset(PromptDataConfig(path=latin), tok)
    bom = tmp_path / "bom.jsonl"  # a leading byte-order mark is an encoding detail, not data
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "answer": "1"}\n')
    assert [r.answer for r in PromptDataset(PromptDataConfig(path=bom), tok).train] == ["1"]
    fake = tmp_path / "fake.parquet"
    fake.write_text('{"prompt": "a", "answer": "1"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"fake\.parquet: expected a readable Parquet file, got ArrowInvalid"):
        PromptDataset(PromptDataConfig(path=fake), tok)


def test_empty_prompts_are_skipped_and_counted_like_missing_answers(tmp_path, tok):
    """Issue 13: one empty prompt aborted the run while a missing answer was skipped and counted."""
    rows = [ROWS[0], {"prompt": "", "answer": "1"}, {"prompt": "   ", "answer": "2"}, {"prompt": None, "answer": "3"},
            {"prompt": [{"role": "user", "content": " "}], "answer": "4"}, {"prompt": [], "answer": "5"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = PromptDataset(PromptDataConfig(path=path), tok)
    assert dict(ds.skipped) == {"empty_prompt": 5}
    assert [r.row for r in ds.train] == [0]
    with pytest.raises(ValueError, match=r"d\.jsonl:2 \(row 1\): field 'prompt': expected a non-empty prompt, "
                                         r"got ''"):
        PromptDataset(PromptDataConfig(path=path, empty_prompt="error"), tok)
    with pytest.raises(ValueError, match=r"PromptDataConfig\.empty_prompt: expected 'skip' or 'error'"):
        PromptDataConfig(path=path, empty_prompt="drop")


def test_answer_check_rejections_are_counted_as_gold_unparsable(tmp_path, tok):
    rows = [ROWS[0], {"prompt": "b", "answer": "bad"}, {"prompt": "c", "answer": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    check = lambda a: "injected" if a == "bad" else None  # noqa: E731
    ds = PromptDataset(PromptDataConfig(path=path), tok, answer_check=check)
    assert dict(ds.skipped) == {"gold_unparsable": 1}
    assert [r.row for r in ds.train] == [0, 2]
    with pytest.raises(ValueError, match=r"d\.jsonl:2 \(row 1\): field 'answer': expected a gold answer the "
                                         r"reward can parse, got 'bad' \(injected\)"):
        PromptDataset(PromptDataConfig(path=path, missing_answer="error"), tok, answer_check=check)


def test_a_tokenizer_failure_names_the_row(tmp_path, tok):
    class Failing:
        chat_template = None

        def encode(self, text):
            if "boom" in text:
                raise RuntimeError("cannot encode")
            return tok.encode(text)

    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"prompt": "boom", "answer": "1"}])
    with pytest.raises(ValueError, match=r"d\.jsonl:2 \(row 1\): field 'prompt': the tokenizer could not render "
                                         r"this prompt \(RuntimeError: cannot encode\)"):
        PromptDataset(PromptDataConfig(path=path), Failing())
