"""Which of several SFT attempts becomes the testbed's base (`experiments/testbed.py: choose_base`): prints the
chosen directory and, on stderr, every attempt's pass@1, steps and seconds. Used by bench/run_gpu_testbed.sh
when SFT_FLAGS holds several flag sets.

    python bench/choose_sft_base.py /tmp/sft/0 /tmp/sft/1 ...   # dirs holding sft.json (missing ones skipped)
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vespo_megatron.experiments.testbed import choose_base  # noqa: E402


def main(dirs) -> int:
    records = {}
    for d in dirs:
        path = os.path.join(d, "sft.json")
        if os.path.isfile(path):
            with open(path) as f:
                records[d] = json.load(f)
        print(f"{d}: " + (f"pass@1 {records[d]['eval/pass@1']:.3f} after {records[d]['sft_steps']} steps, "
                          f"{records[d]['seconds']} s" if d in records else "no sft.json"), file=sys.stderr)
    if not records:
        print("no SFT attempt finished", file=sys.stderr)
        return 1
    print(choose_base(records))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
