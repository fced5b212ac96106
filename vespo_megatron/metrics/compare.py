"""Compare two runs' metric files step by step: `python -m vespo_megatron.metrics.compare a.jsonl b.jsonl`.

Exit 0 when every metric of every step is equal (wall-clock and memory fields aside; NaN equals NaN), 1
otherwise, with the first differences printed. Used to show that a refactor or an option that must not
change the numbers (e.g. a fused kernel at the same precision) leaves a run identical for the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

__all__ = ["load_steps", "differences"]

IGNORED_PREFIXES = ("time", "memory/")


def load_steps(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [r for r in (json.loads(line) for line in f if line.strip()) if "step" in r]


def differences(a: list[dict], b: list[dict], *, rtol: float = 0.0) -> list[str]:
    out = [] if len(a) == len(b) else [f"step count: {len(a)} vs {len(b)}"]
    for x, y in zip(a, b, strict=False):
        for key in sorted(set(x) | set(y)):
            if key.startswith(IGNORED_PREFIXES):
                continue
            u, v = x.get(key), y.get(key)
            if isinstance(u, float) and isinstance(v, float):
                if (math.isnan(u) and math.isnan(v)) or abs(u - v) <= rtol * max(abs(u), abs(v)):
                    continue
            elif u == v:
                continue
            out.append(f"step {x.get('step')}: {key}: {u!r} vs {v!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: exact)")
    args = p.parse_args(argv)
    a, b = load_steps(args.a), load_steps(args.b)
    diff = differences(a, b, rtol=args.rtol)
    keys = len({k for r in a for k in r if not k.startswith(IGNORED_PREFIXES)})
    if diff:
        print(f"{len(diff)} differences, first ones:\n  " + "\n  ".join(diff[:20]))
        return 1
    print(f"identical: {len(a)} steps, {keys} metrics each (time and memory fields not compared)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
