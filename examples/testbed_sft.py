"""The testbed's SFT base (issue 17): train the MoE on the reasoning task's traces to a held-out pass@1 of
about 25 %, cached as an HF checkpoint in <out-dir>/hf that RL runs start from (`vespo-train --base testbed
--hf-checkpoint runs/testbed/sft/hf`). See vespo_megatron/experiments/testbed.py (`--help`).

    python examples/testbed_sft.py                       # one H200: <= 5 minutes
    python examples/testbed_sft.py --tiny --out-dir /tmp/sft --max-steps 4 --eval-every 2   # CPU smoke
"""

import sys

from vespo_megatron.experiments.testbed import main

if __name__ == "__main__":
    sys.exit(main())
