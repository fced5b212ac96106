"""Print a testbed base's greedy answers next to the gold traces on its first held-out problems. Not a test.

    python bench/base_samples.py --hf-checkpoint runs/testbed/sft/hf [--count 6] [--levels 3,4,5,6]

What a base gets wrong (format, length, operand digits, carries, the read-out of the sum) shows here before any
pass rate does: docs/results/testbed/README.md quotes it for the round-7 base. Greedy = temperature 1e-4.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-checkpoint", required=True, metavar="DIR")
    p.add_argument("--count", type=int, default=6)
    p.add_argument("--levels", default=None, help="the task's level mix (default: the testbed's)")
    args = p.parse_args(argv)

    from vespo_megatron.rollout.engine import GenerationRequest
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.launch import init_distributed
    from vespo_megatron.training.trainer import Trainer

    flags = ["--base", "testbed", "--hf-checkpoint", args.hf_checkpoint, "--threads", "2", "--no-console",
             "--out-dir", "/tmp/base_samples", *(["--levels", args.levels] if args.levels else [])]
    init_distributed()
    trainer = Trainer(train_cli.config_from_argv(flags))
    task = trainer.task
    problems = task.eval_problems()[: args.count]
    reqs = [GenerationRequest(sample_id=str(i), prompt_ids=tuple(q.prompt_ids), max_new_tokens=task.max_new_tokens,
                              temperature=1e-4) for i, q in enumerate(problems)]
    for q, g in zip(problems, trainer.engine.generate(reqs, seed=0), strict=True):
        print(f"{q.text} | gold {task.trace(q)} | got {task.tok.decode(list(g.output_ids))} | "
              f"reward {task.reward(q, g.output_ids):.0f}")


if __name__ == "__main__":
    main()
