"""Host work of one optimizer update of the testbed, counted on CPU: torch ops dispatched, by the code that issued
them, and the calls that would wait for the GPU on CUDA (`.item()`, `.tolist()`, `float(t)`, copies to the host).

Why: on the H200 the testbed's training steps are host bound (docs/results/testbed/README.md: an N = 64 step is
64 updates of 4 samples, ~60 ms each), so the number of ops an update dispatches, and the syncs among them, is
what decides its time; this counts them without a GPU. It runs one N = 64 testbed step (random weights, the
testbed's model, 32 x 8 rollouts) and counts inside the update named by --update. The fused attention path is
forced (`reference_attention.FUSED_KERNELS = True`) as on CUDA. On CPU, torch's Adam runs per tensor (on CUDA:
foreach), so the optimizer's own ops are listed apart and not counted in "model + loss".

    .venv/bin/python bench/update_op_count.py                   # N = 64, update 5
    .venv/bin/python bench/update_op_count.py --staleness 1     # the N = 1 update (2 packs of 128 samples)

Prints a table (ops per source, syncs) and writes it to --out (default bench/results/update_op_count_cpu.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# A tensor value read on the host (`.item()`, `float(t)`, `bool(t)`, `.tolist()` of small tensors): a device sync on
# CUDA. Copies to the host (`.cpu()`) are not seen on CPU, where they are no ops: the count is a lower bound.
SCALAR_READS = ("_local_scalar_dense",)
# Ops whose output size comes from tensor data: on CUDA each waits for the device to learn the size (a sync),
# on CPU none reads a scalar, so they are counted apart (`OpCounter.data_sized`).
DATA_SIZED = ("masked_select", "nonzero", "repeat_interleave", "unique", "_unique2", "unique_consecutive")


def _host_sized(func, kwargs) -> bool:
    """repeat_interleave given its output_size sizes its output on the host: no sync (int repeats never reach
    the op: they decompose into expand and clone)."""
    return func.overloadpacket.__name__ == "repeat_interleave" and (kwargs or {}).get("output_size") is not None


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by the nearest two frames of vespo_megatron / megatron-core code."""

    def __init__(self):
        super().__init__()
        self.by_source = collections.Counter()
        self.syncs = collections.Counter()
        self.host_reads = collections.Counter()
        self.data_sized = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, chain = sys._getframe(1), []
        while frame is not None and len(chain) < 2:
            name = frame.f_code.co_filename
            if ("vespo_megatron" in name or "megatron/core" in name or "/patches/" in name) and "cpu_shim" not in name:
                chain.append(f"{Path(name).name}:{frame.f_code.co_name}")
            frame = frame.f_back
        source = " <- ".join(chain) or "(other)"
        self.by_source[source] += 1
        if func.overloadpacket.__name__ in SCALAR_READS:
            # the training step's checks of the micro-batch's host copy (`step.host_facts`) read CPU tensors on
            # CUDA too: no sync
            (self.host_reads if "host_facts" in source else self.syncs)[source] += 1
        elif func.overloadpacket.__name__ in DATA_SIZED and not _host_sized(func, kwargs):
            self.data_sized[source] += 1
        return func(*args, **(kwargs or {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--staleness", type=int, default=64)
    p.add_argument("--update", type=int, default=5, help="which update of the step to count (0-based)")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", default="bench/results/update_op_count_cpu.md")
    args = p.parse_args(argv)

    from vespo_megatron.megatron import reference_attention
    from vespo_megatron.training.cli import config_from_argv
    from vespo_megatron.training.launch import init_distributed
    from vespo_megatron.training.trainer import Trainer

    reference_attention.FUSED_KERNELS = True  # the path CUDA takes
    n = args.staleness
    out_dir = tempfile.mkdtemp(prefix="opcount")
    cfg = config_from_argv(["--base", "testbed", "--prompts-per-step", "32", "--group-size", "8", "--staleness", str(n), "--micro-batch-size", str(min(128, 256 // n)),
                            "--logprob-micro-batch-size", "128", "--steps", "1", "--checkpoint-every", "0",
                            "--threads", "2", "--no-console", "--out-dir", out_dir, "--run-name", "count"])
    torch.set_num_threads(2)
    init_distributed()
    trainer = Trainer(cfg)
    trainer.resume()
    counted = {}
    update = trainer._update

    def counting_update(micro_batches, start):
        if start // len(micro_batches) != args.update or counted:
            return update(micro_batches, start)
        counter = OpCounter()
        t0 = time.perf_counter()
        with counter:
            result = update(micro_batches, start)
        counted.update(counter=counter, seconds=time.perf_counter() - t0, samples=sum(m.num_seqs for m in micro_batches))
        return result

    trainer._update = counting_update
    trainer.rl_step(0)
    counter = counted["counter"]
    optimizer = sum(v for k, v in counter.by_source.items() if "step_with_ready_grads" in k)
    total = sum(counter.by_source.values())
    lines = [f"# Ops of one testbed update on CPU (N = {n}, update {args.update}: {counted['samples']} samples)", "",
             f"`python bench/update_op_count.py --staleness {n} --update {args.update}` (torch {torch.__version__}, "
             "random weights, fused attention path forced).", "",
             f"- ops dispatched: {total}, of which torch's Adam {optimizer} (per tensor on CPU, foreach on CUDA); "
             f"model + loss + megatron's grad norm / clip / DDP hooks: **{total - optimizer}**",
             f"- host reads of a tensor value (each a device sync on CUDA; copies to the host are not seen on CPU): "
             f"**{sum(counter.syncs.values())}** (and {sum(counter.host_reads.values())} reads of the micro-batch's "
             "host copy, `step.host_facts`: CPU tensors on CUDA too)",
             f"- CPU seconds of the update (not a GPU number): {counted['seconds']:.2f}", "",
             "| ops | issued by (nearest two frames) | syncs |", "| ---: | --- | ---: |"]
    for source, count in counter.by_source.most_common(args.top):
        lines.append(f"| {count} | `{source}` | {counter.syncs.get(source, 0)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
