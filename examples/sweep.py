"""The sweep command line, `vespo-sweep` when the package is installed: see `vespo_megatron/experiments/cli.py`
(`python examples/sweep.py --help`) for the presets and the commands that made docs/results/."""

import sys

from vespo_megatron.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
