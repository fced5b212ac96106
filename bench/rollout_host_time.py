"""Host time of a testbed rollout step outside the engine's decode (CPU only; not a test).

    python bench/rollout_host_time.py [--steps 5]

The trainer's `time/rollout_s` covers the problems, the engine's `generate` and the rewards and samples
(`build_samples`). This times the parts other than `generate` for the testbed's 32 prompts x 8 samples, with
each sample's output the problem's gold scratchpad trace (the length an SFT base writes), so that what is left
of `time/rollout_s` is the engine. Prints the medians over --steps steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--group-size", type=int, default=8)
    args = p.parse_args(argv)
    from vespo_megatron.rollout.engine import Generation
    from vespo_megatron.training.cli import config_from_argv
    from vespo_megatron.training.reasoning_task import ReasoningTask
    from vespo_megatron.training.samples import Rejections, build_samples

    cfg = config_from_argv(["--base", "testbed"])
    task = ReasoningTask(cfg.task)
    times: dict[str, list[float]] = {"problems": [], "rewards and samples": []}
    lengths = []
    for step in range(args.steps):
        t = time.perf_counter()
        problems = task.problems(step, args.prompts)
        times["problems"].append(time.perf_counter() - t)
        groups_of = [i for i in range(len(problems)) for _ in range(args.group_size)]
        gens = []
        for k, i in enumerate(groups_of):
            out = (*task.tok.encode(task.trace(problems[i])), task.tok.EOS)
            gens.append(Generation(sample_id=str(k), prompt_ids=tuple(problems[i].prompt_ids), output_ids=out,
                                   output_logprobs=(-0.1,) * len(out), weight_version=0, finish_reason="stop"))
            lengths.append(len(out))

        def rewards(idx, valid, problems=problems, groups_of=groups_of):
            return [task.reward(problems[groups_of[i]], v.output_ids) for i, v in zip(idx, valid, strict=True)]

        t = time.perf_counter()
        build_samples(gens, groups_of, rewards, Rejections(), vocab_size=task.tok.vocab_size)
        times["rewards and samples"].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.prompts} x {args.group_size} samples, mean output {statistics.fmean(lengths):.1f} tokens; median "
          "over steps: " + ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in out.items()))
    return out


if __name__ == "__main__":
    main()
