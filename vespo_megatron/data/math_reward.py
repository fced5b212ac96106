"""Math answer reward: math-verify's equivalence check, with a hard time limit and counted failure reasons.

math-verify parses LaTeX into SymPy and compares symbolically; a pathological response can make that run
for minutes. Its own time limits use `signal.alarm`, which works only in the main thread of the main
interpreter and in whole seconds, while the trainer scores from whatever thread it likes. So every check
runs in a small pool of worker processes, and the parent enforces the limit: a worker that has not answered
by its deadline is killed (SIGKILL, which nothing in a hung SymPy call can ignore) and replaced, and its
check counts as "timeout". Workers are started with `subprocess` running `python -c`, not `multiprocessing`:
no fork of a multi-threaded trainer (CUDA, NCCL), and no re-import of the trainer's `__main__` script as
`spawn`/`forkserver` would do.

Every check yields a `RewardResult(reward, reason)`: 1.0 only for "correct", else 0.0 with one of
`REASONS`. A failing checker never raises into training and never fails silently: the reasons are counted
in `RewardStats`, which the trainer logs as `reward/fail/<reason>`.

Extraction: the last `\\boxed{...}` of the response when there is one (balanced braces), otherwise, unless
`require_boxed`, math-verify's own extraction over the whole response (LaTeX with answer anchors, then
plain expressions). The gold answer is parsed as if boxed, then as written.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from vespo_megatron.base.validation import ConfigError

__all__ = ["REASONS", "FAILURE_REASONS", "MathRewardConfig", "RewardResult", "RewardStats",
           "MathRewardChecker", "last_boxed", "gold_problem", "math_verify_check"]

REASONS = ("correct", "wrong", "no_answer", "gold_unparsable", "timeout", "checker_error", "worker_crash")
# Reasons a checker may return; the others are assigned by the pool.
CHECKER_REASONS = ("correct", "wrong", "no_answer", "gold_unparsable")
FAILURE_REASONS = tuple(r for r in REASONS if r not in ("correct", "wrong"))
DEFAULT_CHECKER = "vespo_megatron.data.math_reward:math_verify_check"



@dataclass(frozen=True, kw_only=True)
class MathRewardConfig:
    """`checker` is "module:function", called in the workers as `fn(response, gold, require_boxed=...)` and
    returning one of "correct", "wrong", "no_answer", "gold_unparsable" (tests inject slow or failing
    ones)."""

    timeout_s: float = 5.0
    workers: int = 2
    require_boxed: bool = False
    checker: str = DEFAULT_CHECKER
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        for name in ("timeout_s", "startup_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
                raise ConfigError("MathRewardConfig", name, "a finite number > 0 (seconds)", v)
        if not (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                and 1 <= self.workers <= 256):
            raise ConfigError("MathRewardConfig", "workers", "an int in [1, 256]", self.workers)
        if not isinstance(self.require_boxed, bool):
            raise ConfigError("MathRewardConfig", "require_boxed", "a bool", self.require_boxed)
        mod, _, fn = self.checker.partition(":") if isinstance(self.checker, str) else ("", "", "")
        if not (mod and fn and fn.isidentifier() and all(p.isidentifier() for p in mod.split("."))):
            raise ConfigError("MathRewardConfig", "checker", "'module.path:function'", self.checker)


@dataclass(frozen=True)
class RewardResult:
    reward: float
    reason: str  # one of REASONS


class RewardStats:
    """Thread-safe counts of check outcomes per reason."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def failures(self) -> dict[str, int]:
        """Counts of the reasons that are not a verdict ("correct"/"wrong"), zeros included."""
        with self._lock:
            return {r: self._counts[r] for r in FAILURE_REASONS}

    def log_dict(self, prefix: str = "reward/fail/") -> dict[str, int]:
        return {prefix + r: n for r, n in self.failures().items()}

    def reset(self) -> dict[str, int]:
        """Returns the counts so far and starts again from zero (per-interval logging)."""
        with self._lock:
            counts, self._counts = dict(self._counts), Counter()
            return counts


# --- the check itself (runs in the workers) ----------------------------------------------------------------

def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    while start >= 0:
        i = text.index("{", start) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0:
            return text[i:j - 1]
        # unbalanced (a truncated response): try an earlier box
        start = max(text.rfind("\\boxed{", 0, start), text.rfind("\\fbox{", 0, start))
    return None


# LaTeX that holds text rather than math, and command names: neither is a prose word.
_TEXT_GROUPS = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{[^{}]*\}")
_COMMANDS = re.compile(r"\\[A-Za-z]+")
_WORDS = re.compile(r"(?<![A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")


def gold_problem(gold: str) -> str | None:
    """Why a gold answer cannot be scored, found without SymPy (cheap enough for every row at load time), or
    None. Two cases math-verify does not refuse by itself: unbalanced braces (`\\frac{{{` parses to a bare
    string) and prose (`hello world` parses to the product of its letters, so any answer is "wrong"). Prose
    is two or more words of 2+ letters outside `\\text{...}` and LaTeX commands; a single word ("Monday",
    "cm") stays an answer."""
    depth = 0
    for ch in gold:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            break
    if depth != 0:
        return "unbalanced braces"
    words = _WORDS.findall(_COMMANDS.sub(" ", _TEXT_GROUPS.sub(" ", gold)))
    if len(words) >= 2:
        return f"prose, not math: words {words[:4]}"
    return None


def math_verify_check(response: str, gold: str, *, require_boxed: bool = False) -> str:
    # math-verify's signal-based timeouts are off (None): the parent's deadline and SIGKILL bound the time.
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    latex = LatexExtractionConfig(boxed_match_priority=0, normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="last", equations=False))
    configs = [latex, ExprExtractionConfig()]
    if gold_problem(gold) is not None:
        return "gold_unparsable"
    gold_parsed = parse(f"\\boxed{{{gold}}}", configs, parsing_timeout=None) or parse(gold, configs,
                                                                                       parsing_timeout=None)
    # parse() returns [expression, matched string], or only the string when nothing converted to SymPy:
    # a gold answer without an expression cannot be compared, so it is bad data, not a "wrong" response.
    if not any(not isinstance(g, str) for g in gold_parsed):
        return "gold_unparsable"
    boxed = last_boxed(response)
    if boxed is not None:
        pred = parse(f"\\boxed{{{boxed}}}", configs, parsing_timeout=None) if boxed.strip() else []
    elif require_boxed:
        pred = []
    else:
        pred = parse(response, configs, parsing_timeout=None)
    if not pred:
        return "no_answer"
    return "correct" if verify(gold_parsed, pred, timeout_seconds=None) else "wrong"


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _worker_main() -> None:
    """Worker loop: JSON lines in on stdin, JSON lines out on the original stdout (fd 1 is pointed at stderr
    so that prints in checkers cannot corrupt the protocol)."""
    import logging

    # Ctrl-C reaches the whole process group: the trainer handles it and stops us (kill, or the orphan watch);
    # a worker's own KeyboardInterrupt would only add tracebacks to the one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the "timeout disabled" notice is intended

    def send(msg: dict) -> None:
        out.write(json.dumps(msg).encode() + b"\n")

    parent = os.getppid()

    def orphan_watch() -> None:  # a hung check must not outlive a crashed trainer
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=orphan_watch, daemon=True).start()
    init = json.loads(sys.stdin.buffer.readline())
    options = init["options"]
    try:
        fn = _resolve(init["checker"])
        if init["checker"] == DEFAULT_CHECKER:
            fn("\\boxed{1}", "1", **options)  # import SymPy and build the parsers before the first deadline
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises
        send({"error": f"cannot load checker {init['checker']!r}: {type(e).__name__}: {e}"})
        return
    send({"ready": True})
    for line in sys.stdin.buffer:
        job = json.loads(line)
        try:
            send({"id": job["id"], "reason": fn(job["response"], job["gold"], **options)})
        except Exception as e:  # noqa: BLE001
            send({"id": job["id"], "error": f"{type(e).__name__}: {e}"[:500]})


# --- the pool (parent side) --------------------------------------------------------------------------------

class _Worker:
    def __init__(self, init: dict):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        boot = "from vespo_megatron.data.math_reward import _worker_main; _worker_main()"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", boot], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        try:
            self.proc.stdin.write(json.dumps(init).encode() + b"\n")
        except BrokenPipeError:
            pass  # it died at once: seen as EOF, reported as a failed start
        self.started = time.monotonic()
        self.ready = False
        self.job: int | None = None
        self.deadline = math.inf
        self._buf = b""

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, job: int, response: str, gold: str, timeout_s: float) -> None:
        self.job, self.deadline = job, time.monotonic() + timeout_s
        try:
            msg = {"id": job, "response": response, "gold": gold}
            self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        except BrokenPipeError:
            pass  # it died: its stdout reaches EOF and the job counts as "worker_crash"

    def read(self) -> list[dict] | None:
        """The complete messages available now; None once the worker has exited (EOF)."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        *lines, self._buf = (self._buf + data).split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.kill()


class MathRewardChecker:
    """A pool of `cfg.workers` checker processes, started at construction (it waits until they are ready,
    raising if the checker cannot be loaded). `score_many` checks a whole batch concurrently; calls from
    several threads are serialized (each call's deadlines start when its checks reach a worker)."""

    def __init__(self, cfg: MathRewardConfig | None = None, stats: RewardStats | None = None):
        self.cfg = cfg or MathRewardConfig()
        self.stats = stats if stats is not None else RewardStats()
        self._init = {"checker": self.cfg.checker, "options": {"require_boxed": self.cfg.require_boxed}}
        self._lock = threading.Lock()
        self._workers = [_Worker(self._init) for _ in range(self.cfg.workers)]
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)
        self.last_error: str | None = None  # the latest checker exception, for the logs
        with self._lock:
            self._run([])  # wait until every worker is ready

    def score(self, response: str, gold: str) -> RewardResult:
        return self.score_many([(response, gold)])[0]

    def score_many(self, pairs: Iterable[tuple[str, str]]) -> list[RewardResult]:
        pairs = [(str(r), str(g)) for r, g in pairs]
        with self._lock:
            if not self._finalizer.alive:
                raise RuntimeError("MathRewardChecker: used after close() or a failed worker start")
            reasons = self._run(pairs)
        results = [RewardResult(1.0 if r == "correct" else 0.0, r) for r in reasons]
        for r in reasons:
            self.stats.add(r)
        return results

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker(self._init)

    def _run(self, pairs: list[tuple[str, str]]) -> list[str]:
        try:
            return self._run_unsafe(pairs)
        except BaseException:
            self._finalizer()  # a worker that cannot start is an environment problem: stop, do not limp on
            raise

    def _run_unsafe(self, pairs: list[tuple[str, str]]) -> list[str]:
        reasons: list[str | None] = [None] * len(pairs)
        todo = list(range(len(pairs) - 1, -1, -1))  # popped from the end: in order
        while todo or any(w.job is not None or not w.ready for w in self._workers):
            for w in self._workers:
                if w.ready and w.job is None and todo:
                    j = todo.pop()
                    w.send(j, *pairs[j], self.cfg.timeout_s)
            now = time.monotonic()
            wake = min(w.deadline if w.ready else w.started + self.cfg.startup_timeout_s
                       for w in self._workers if w.job is not None or not w.ready)
            # poll, not select: the trainer may hold file descriptors beyond select's limit of 1024
            poller = select.poll()
            by_fd = {w.fileno(): w for w in self._workers}
            for fd in by_fd:
                poller.register(fd, select.POLLIN)
            events = poller.poll(max(0, math.ceil((wake - now) * 1000)))
            for fd, _ in events:
                w = by_fd[fd]
                i = self._workers.index(w)
                msgs = w.read()
                if msgs is None:
                    if not w.ready:
                        w.kill()
                        raise RuntimeError(f"MathRewardChecker: a checker worker exited during start-up "
                                           f"(exit code {w.proc.returncode}; its stderr is this process's)")
                    if w.job is not None:
                        reasons[w.job] = "worker_crash"
                    self._replace(i)
                    continue
                for msg in msgs:
                    if "ready" in msg:
                        w.ready = True
                    elif "error" in msg and "id" not in msg:
                        w.kill()
                        raise RuntimeError(f"MathRewardChecker: {msg['error']}")
                    elif msg.get("id") == w.job:
                        reason = msg.get("reason")
                        if "error" in msg or reason not in CHECKER_REASONS:
                            self.last_error = msg.get("error") or f"checker returned {reason!r}"
                        reasons[w.job] = reason if reason in CHECKER_REASONS else "checker_error"
                        w.job, w.deadline = None, math.inf
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.job is not None and now >= w.deadline:
                    reasons[w.job] = "timeout"
                    self._replace(i)
                elif not w.ready and now >= w.started + self.cfg.startup_timeout_s:
                    w.kill()
                    raise RuntimeError(f"MathRewardChecker: a checker worker was not ready within "
                                       f"startup_timeout_s={self.cfg.startup_timeout_s}")
        return reasons  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            self._finalizer()

    def __enter__(self) -> MathRewardChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
