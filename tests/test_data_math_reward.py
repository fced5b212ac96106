"""MathRewardChecker: math-verify verdicts, a time limit that holds from any thread (hung workers are killed
and replaced), and every failure counted by reason instead of raised."""

import os
import signal
import sys
import threading
import time

import pytest

from vespo_megatron.data.math_reward import (
    FAILURE_REASONS,
    MathRewardChecker,
    MathRewardConfig,
    RewardResult,
    RewardStats,
    gold_problem,
    last_boxed,
)


def fake_checker(response, gold, **_):
    """Injected into the workers by `MathRewardConfig.checker` (they import this module by name)."""
    if response.startswith("sleep:"):
        time.sleep(float(response.split(":")[1]))
        return "correct"
    if response == "raise":
        raise ZeroDivisionError("injected failure")
    if response == "exit":
        os._exit(3)
    if response == "bogus":
        return "maybe"
    return "correct" if response == gold else "wrong"


@pytest.fixture(scope="module")
def checker():
    with MathRewardChecker(MathRewardConfig(workers=2, timeout_s=10.0)) as c:
        yield c


@pytest.fixture(scope="module")
def fake():
    cfg = MathRewardConfig(workers=2, timeout_s=1.0, checker=f"{__name__}:fake_checker")
    with MathRewardChecker(cfg) as c:
        yield c


def test_last_boxed():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}+{b}}") == "{a}+{b}"
    assert last_boxed("\\boxed{3} and a truncated \\boxed{\\frac{1") == "3"
    assert last_boxed("\\fbox{4}") == "4"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("response, gold, reason", [
    ("So the answer is \\boxed{\\frac{1}{2}}.", "0.5", "correct"),
    ("\\boxed{0.5}", "\\frac{1}{2}", "correct"),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", "correct"),
    ("First \\boxed{3}, on reflection \\boxed{2}", "2", "correct"),  # the last box is the answer
    ("First \\boxed{2}, on reflection \\boxed{3}", "2", "wrong"),
    ("\\boxed{2}", "3", "wrong"),
    ("The final answer is 7", "7", "correct"),  # no box: math-verify's own extraction
    ("I am not sure.", "3", "no_answer"),
    ("\\boxed{}", "3", "no_answer"),
    ("\\boxed{1}", "}{", "gold_unparsable"),
    # issue 13: these were scored "wrong" (a bare string; the product of the letters h*e*l*l*o*...)
    ("\\boxed{1}", "\\frac{{{", "gold_unparsable"),
    ("\\boxed{hello world}", "hello world", "gold_unparsable"),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", "correct"),  # text in \text{} is still an answer
])
def test_math_verify_verdicts(checker, response, gold, reason):
    result = checker.score(response, gold)
    assert result == RewardResult(1.0 if reason == "correct" else 0.0, reason)


@pytest.mark.parametrize("gold, problem", [
    ("\\frac{{{", "unbalanced braces"), ("}{", "unbalanced braces"), ("hello world", "prose"),
    ("x in terms of y", "prose"), ("1", None), ("\\frac{1}{2}", None), ("Monday", None), ("5 cm", None),
    ("\\text{hello world}", None), ("\\sqrt{2}\\pi", None), ("\\{1,2\\}", None),
])
def test_gold_problem_is_a_cheap_load_time_check(gold, problem):
    got = gold_problem(gold)
    assert got is None if problem is None else problem in got


def test_require_boxed_ignores_unboxed_answers():
    with MathRewardChecker(MathRewardConfig(workers=1, require_boxed=True)) as c:
        assert [r.reason for r in c.score_many([("The final answer is 7", "7"), ("\\boxed{7}", "7")])] == \
            ["no_answer", "correct"]


def test_counts_accumulate_per_reason(checker):
    checker.stats.reset()
    pairs = [("\\boxed{1}", "1"), ("\\boxed{2}", "1"), ("\\boxed{1}", "1"), ("nothing", "1"),
             ("\\boxed{1}", "}{")]
    assert [r.reward for r in checker.score_many(pairs)] == [1.0, 0.0, 1.0, 0.0, 0.0]
    checker.score("\\boxed{5}", "5")
    assert checker.stats.counts() == {"correct": 3, "wrong": 1, "no_answer": 1, "gold_unparsable": 1}
    assert checker.stats.log_dict() == {"reward/fail/no_answer": 1, "reward/fail/gold_unparsable": 1,
                                        "reward/fail/timeout": 0, "reward/fail/checker_error": 0,
                                        "reward/fail/worker_crash": 0}
    assert checker.stats.reset()["correct"] == 3 and checker.stats.counts() == {}


def test_scoring_from_worker_threads(checker):
    out = {}

    def work(i):
        out[i] = checker.score(f"\\boxed{{{i}}}", str(i if i % 2 else i + 1)).reason

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == {0: "wrong", 1: "correct", 2: "wrong", 3: "correct"}


def test_timeout_from_a_thread_kills_and_replaces_the_hung_worker(fake):
    fake.stats.reset()
    before = {w.proc.pid for w in fake._workers}
    out = []
    t0 = time.monotonic()
    # from a non-main thread, where math-verify's own signal.alarm limit could not work
    pairs = [("sleep:60", "1"), ("1", "1"), ("2", "1")]
    t = threading.Thread(target=lambda: out.append(fake.score_many(pairs)))
    t.start()
    t.join()
    elapsed = time.monotonic() - t0
    (results,) = out
    assert [r.reason for r in results] == ["timeout", "correct", "wrong"]
    assert results[0].reward == 0.0
    assert elapsed < 1.0 + 1.5, elapsed
    after = {w.proc.pid for w in fake._workers}
    (killed,) = before - after
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # gone (killed and reaped), not left running
    assert [r.reason for r in fake.score_many([("3", "3")] * 3)] == ["correct"] * 3  # the pool still works
    assert fake.stats.counts() == {"timeout": 1, "correct": 4, "wrong": 1}


def test_checks_run_concurrently():
    cfg = MathRewardConfig(workers=2, timeout_s=10.0, checker=f"{__name__}:fake_checker")
    with MathRewardChecker(cfg) as checker:
        checker.score_many([("1", "1"), ("1", "1")])  # the workers are up
        t0 = time.monotonic()
        reasons = [r.reason for r in checker.score_many([("sleep:1.5", "1"), ("sleep:1.5", "1")])]
        elapsed = time.monotonic() - t0
    assert reasons == ["correct"] * 2
    # two workers: ~1.5 s, not 3 s (a wide gap: a loaded CI machine adds its overhead to both)
    assert elapsed < 2.6, elapsed


def test_checker_failures_are_counted_not_raised(fake):
    fake.stats.reset()
    results = fake.score_many([("raise", "1"), ("bogus", "1"), ("exit", "1"), ("1", "1")])
    assert [(r.reward, r.reason) for r in results] == [(0.0, "checker_error"), (0.0, "checker_error"),
                                                       (0.0, "worker_crash"), (1.0, "correct")]
    assert fake.last_error in ("ZeroDivisionError: injected failure", "checker returned 'maybe'")
    expected = {"checker_error": 2, "worker_crash": 1}
    assert fake.stats.failures() == {r: expected.get(r, 0) for r in FAILURE_REASONS}
    assert fake.score("1", "1").reason == "correct"


def test_unloadable_checker_fails_at_start_and_config_is_validated():
    with pytest.raises(RuntimeError, match=r"cannot load checker 'no_such_module_xyz:check': "
                                           r"ModuleNotFoundError"):
        MathRewardChecker(MathRewardConfig(workers=1, checker="no_such_module_xyz:check"))
    with pytest.raises(ValueError, match=r"MathRewardConfig\.timeout_s: expected a finite number > 0 .*"
                                         r"got 0"):
        MathRewardConfig(timeout_s=0)
    with pytest.raises(ValueError, match=r"MathRewardConfig\.checker: expected 'module\.path:function', "
                                         r"got 'f'"):
        MathRewardConfig(checker="f")
    with pytest.raises(ValueError, match=r"MathRewardConfig\.workers: expected an int in \[1, 256\], got 0"):
        MathRewardConfig(workers=0)


def test_closed_checker_refuses_work():
    c = MathRewardChecker(MathRewardConfig(workers=1, checker=f"{__name__}:fake_checker"))
    pid = c._workers[0].proc.pid
    c.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(RuntimeError, match="used after close"):
        c.score("1", "1")


def test_stats_are_thread_safe():
    stats = RewardStats()
    threads = [threading.Thread(target=lambda: [stats.add("wrong") for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.counts() == {"wrong": 4000}


def test_workers_ignore_ctrl_c_the_trainer_handles_it(fake):
    """Ctrl-C reaches the whole process group; a worker's own KeyboardInterrupt would print a traceback next
    to the trainer's one-line message (issue 13) and lose the check in flight."""
    proc = fake._workers[0].proc
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None
    assert [r.reason for r in fake.score_many([("a", "a"), ("b", "c")])] == ["correct", "wrong"]


def test_checker_workers_do_not_import_torch():
    """Each worker process imports this module; torch there would add seconds to every start and to every
    replacement of a hung worker (the timeout test above measures that)."""
    import subprocess

    code = "import sys, vespo_megatron.data.math_reward; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
