"""The testbed end to end on CPU at toy size: the SFT base command (cached on a second call), then the
`cpu_smoke` sweep preset starting from it (2 runs x 2 steps, eval every step) and its report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.megatron
ROOT = Path(__file__).resolve().parents[1]


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300, **kw)


def test_sft_base_then_cpu_smoke_sweep(tmp_path):
    sft = tmp_path / "sft"
    _run(["examples/testbed_sft.py", "--tiny", "--out-dir", str(sft), "--max-steps", "2", "--eval-every", "1"])
    record = json.loads((sft / "sft.json").read_text())
    assert record["sft_steps"] == 2 and record["stopped"] in ("max_steps", "target")
    assert [h["sft_step"] for h in record["history"]][-1] == 2
    assert 0 <= record["eval/pass@1"] <= 1 and record["history"][-1]["eval/num_problems"] == 4
    hf = json.loads((sft / "hf" / "config.json").read_text())
    assert hf["vocab_size"] == 64 and hf["num_experts"] == 4
    again = _run(["examples/testbed_sft.py", "--tiny", "--out-dir", str(sft)])
    assert "cached" in again.stderr  # not trained twice

    runs, results = tmp_path / "runs", tmp_path / "results"
    _run(["examples/sweep.py", "--preset", "cpu_smoke", "--init-checkpoint", str(sft / "hf"), "--runs-dir",
          str(runs), "--results-dir", str(results), "--jobs", "2"])
    for name in ("n1-vespo-s0", "n1-grpo_tis-s0"):
        rows = [json.loads(line) for line in (runs / name / f"{name}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        assert all(0 <= r["eval/pass@1"] <= 1 and r["response/length_mean"] > 0 for r in rows)
    table = (results / "table.md").read_text()
    assert "| n1 | vespo | 1 | 2/2 |" in table and "| n1 | grpo+tis | 1 | 2/2 |" in table
    assert "final eval pass@1" in table


def test_compare_losses_gpu_preset_commands(tmp_path):
    """`--preset gpu` builds the SFT base, then the headline sweep from it (PYTHON replaced by a recorder)."""
    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), OUT=str(tmp_path / "out"), JOBS="3")
    subprocess.run(["bash", "examples/compare_losses.sh", "--preset", "gpu", "--only", "n16-*"], env=env, cwd=ROOT,
                   check=True, timeout=60)
    sft, sweep = log.read_text().splitlines()
    assert sft == f"examples/testbed_sft.py --out-dir {tmp_path}/out/sft"
    assert sweep == (f"examples/sweep.py --preset headline --init-checkpoint {tmp_path}/out/sft/hf --runs-dir "
                     f"{tmp_path}/out/runs --results-dir {tmp_path}/out/results --jobs 3 --only n16-*")
    bad = subprocess.run(["bash", "examples/compare_losses.sh", "--preset", "tpu"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--preset" in bad.stderr


def test_choose_base_prefers_the_fastest_in_range_else_the_closest():
    from vespo_megatron.experiments.testbed import choose_base

    def rec(p, s):
        return {"eval/pass@1": p, "seconds": s}

    # in range [0.2, 0.4]: the fastest of those, not the highest pass rate nor the first
    assert choose_base({"a": rec(0.51, 60), "b": rec(0.38, 90), "c": rec(0.25, 70)}) == "c"
    # none in range: the closest to it, from below or above
    assert choose_base({"a": rec(0.05, 10), "b": rec(0.47, 99)}) == "b"
    assert choose_base({"a": rec(0.15, 10), "b": rec(0.47, 9)}) == "a"
    assert choose_base({"a": rec(0.0, 1), "b": rec(0.0, 2)}) == "a"  # ties: the first
    assert choose_base({"a": rec(0.3, 5)}, pass_range=(0.5, 0.9)) == "a"
    with pytest.raises(ValueError, match="records"):
        choose_base({})


def test_gpu_testbed_script_on_cpu_two_sft_attempts(tmp_path):
    """bench/run_gpu_testbed.sh at toy size: two SFT attempts at once, the chooser's pick becomes the base (sent
    back in pieces), every attempt's record comes back under $OUT; a budget already spent skips the sweep slice
    (its path, unchanged since rounds 5-7, is the `cpu_smoke` sweep of the test above)."""
    import tarfile

    from vespo_megatron.experiments.testbed import TINY_MODEL_FLAGS, TINY_RUN_FLAGS

    tiny = " ".join(TINY_MODEL_FLAGS + TINY_RUN_FLAGS)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), WORK_DIR=str(tmp_path / "w"), WHEELS_DIR=str(tmp_path / "no_wheels"),
               BASE_PIECES_DIR=str(tmp_path / "no_base"),
               PYTHON=sys.executable, SFT_TIME="1",
               SFT_EVAL_EVERY="1", SFT_FLAGS=f"{tiny} --sft-lr 1e-3; {tiny} --sft-lr 3e-3",
               SWEEP_ARGS="--preset cpu_smoke", JOBS="1", BUDGET_S="1")
    proc = subprocess.run(["bash", "bench/run_gpu_testbed.sh"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "chosen base: " in proc.stdout and "SFT 1:" in proc.stdout
    with tarfile.open(out / "logs.tar") as t:
        names = set(t.getnames())
    assert {"sft/0/sft.json", "sft/1/sft.json", "base/sft.json", "logs/sft0.log", "logs/sft1.log"} <= names
    assert "logs/sweep.log" not in names and "sweep (--preset cpu_smoke)" in proc.stdout  # budget spent
    chosen = proc.stdout.split("chosen base: ")[1].split()[0]
    records = {d: json.loads((Path(d) / "sft.json").read_text()) for d in (f"{tmp_path}/w/sft/0", f"{tmp_path}/w/sft/1")}
    from vespo_megatron.experiments.testbed import choose_base

    assert chosen == choose_base(records)
    assert sorted(out.glob("sft_base.planes.gz.part-*"))  # bench/base_pieces.py's pieces: they unpack to the base
    sys.path.insert(0, str(ROOT / "bench"))
    from base_pieces import unpack

    unpack(str(out), str(tmp_path / "back"))
    for name in ("hf/config.json", "hf/model.safetensors", "sft.json"):
        assert (tmp_path / "back" / name).read_bytes() == (Path(chosen) / name).read_bytes()


@pytest.mark.parametrize("form", ["tar", "planes"])
def test_gpu_testbed_script_takes_a_carried_base_in_pieces(tmp_path, form):
    """bench/run_gpu_testbed.sh with a base carried in pieces: byte planes (`bench/base_pieces.py`, what it sends
    back now), or a plain tar (earlier rounds): the base is unpacked and named, no SFT runs (budget
    spent: no sweep)."""
    import io
    import tarfile

    record = {"eval/pass@1": 0.3125, "sft_steps": 140, "flags": ["--levels", "3,4,5,6"]}
    pieces = tmp_path / "base"
    pieces.mkdir()
    if form == "planes":
        src = tmp_path / "src"
        (src / "hf").mkdir(parents=True)
        (src / "sft.json").write_text(json.dumps(record))
        (src / "hf" / "config.json").write_text("{}")
        sys.path.insert(0, str(ROOT / "bench"))
        from base_pieces import PIECE_BYTES, pack

        paths = pack(str(src), str(pieces))
        assert len(paths) == 1 and os.path.getsize(paths[0]) < PIECE_BYTES
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, data in (("sft.json", json.dumps(record).encode()), ("hf/config.json", b"{}")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        blob = buf.getvalue()
        stem = "sft_base.tar.part-"
        half = len(blob) // 2
        (pieces / f"{stem}aa").write_bytes(blob[:half])
        (pieces / f"{stem}ab").write_bytes(blob[half:])
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), WORK_DIR=str(tmp_path / "w"), WHEELS_DIR=str(tmp_path / "no_wheels"),
               BASE_PIECES_DIR=str(pieces), PYTHON=sys.executable, SWEEP_ARGS="--preset cpu_smoke", BUDGET_S="1")
    proc = subprocess.run(["bash", "bench/run_gpu_testbed.sh"], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"base from {pieces}: 0.3125 140 ['--levels', '3,4,5,6']" in proc.stdout
    assert "SFT 0" not in proc.stdout and not list(out.glob("sft_base.*"))
    assert json.loads((tmp_path / "w" / "base" / "sft.json").read_text()) == record


def test_base_pieces_round_trip_bitwise_and_in_pieces(tmp_path, monkeypatch):
    """bench/base_pieces.py: byte planes of fp32 weights gzip smaller than the plain tar gzipped, and unpack gives
    every file back bit for bit, also across several pieces; a lengths mismatch is refused by name."""
    import gzip
    import io
    import tarfile

    import numpy as np

    sys.path.insert(0, str(ROOT / "bench"))
    import base_pieces

    src = tmp_path / "src"
    (src / "hf").mkdir(parents=True)
    rng = np.random.default_rng(0)
    weights = (rng.standard_normal(200_003) * 0.02).astype(np.float32).tobytes()  # not a multiple of 4 in all
    (src / "hf" / "model.safetensors").write_bytes(struct_header() + weights + b"xyz")
    (src / "sft.json").write_text('{"eval/pass@1": 0.3}')
    monkeypatch.setattr(base_pieces, "PIECE_BYTES", 300_000)
    paths = base_pieces.pack(str(src), str(tmp_path / "pieces"))
    assert len(paths) >= 2
    packed = sum(os.path.getsize(p) for p in paths)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        t.add(src / "hf", arcname="hf")
        t.add(src / "sft.json", arcname="sft.json")
    assert packed < 0.95 * len(gzip.compress(buf.getvalue(), compresslevel=6))
    base_pieces.unpack(str(tmp_path / "pieces"), str(tmp_path / "back"))
    for name in ("hf/model.safetensors", "sft.json"):
        assert (tmp_path / "back" / name).read_bytes() == (src / name).read_bytes()
    blob = base_pieces.to_planes(b"abcdefg")
    assert base_pieces.from_planes(blob) == b"abcdefg"
    with pytest.raises(ValueError, match=r"base pieces: expected the magic b'VBPLANES' at the start"):
        base_pieces.from_planes(b"NOTMAGIC" + blob[8:])
    with pytest.raises(ValueError, match=r"pieces_dir: expected sft_base.planes.gz.part-\* files in"):
        base_pieces.unpack(str(tmp_path / "src"), str(tmp_path / "x"))


def struct_header() -> bytes:
    """A safetensors-like header: 8-byte length, then JSON padded to a multiple of 8 (as safetensors pads it)."""
    import struct

    meta = b'{"w": {"dtype": "F32"}}'
    meta += b" " * ((-len(meta)) % 8)
    return struct.pack("<Q", len(meta)) + meta


def test_carried_bytes_counts_the_tree_and_the_carried_paths(tmp_path):
    """bench/base_pieces.py carried: tracked and untracked-not-ignored files, not ignored ones, plus each carried
    path (a folder walked, or a file), as a device call counts them against its 64 MiB."""
    sys.path.insert(0, str(ROOT / "bench"))
    from base_pieces import carried_bytes

    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "a.txt").write_bytes(b"x" * 100)
    (repo / "sub" / "b.txt").write_bytes(b"y" * 30)
    (repo / ".gitignore").write_text("/big/\n")
    (repo / "big").mkdir()
    (repo / "big" / "w.bin").write_bytes(b"z" * 1000)
    (repo / "big" / "v.bin").write_bytes(b"z" * 24)
    subprocess.run(["git", "-C", str(repo), "add", "a.txt"], check=True)
    sizes = carried_bytes(str(repo), ["big", "big/v.bin"])
    assert sizes == {"tree": 100 + 30 + len("/big/\n"), "big": 1024, "big/v.bin": 24}


def test_run_stats_compares_runs_within_a_setting_and_across_directories(tmp_path):
    """bench/testbed_run_stats.py: losses of one setting and seed against the first, and --against: each run
    against the run of that name in another directory; the first step whose reward differs is named."""
    def write(root, name, rewards):
        d = root / name
        d.mkdir(parents=True)
        rows = [{"step": i + 1, "reward/mean": r, "grad_norm_mean": 1.0 + i, "time": 10.0 * i, "time/step_s": 1.0}
                for i, r in enumerate(rewards)]
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    a, b = tmp_path / "a", tmp_path / "b"
    write(a, "n4-grpo-s0", [0.1, 0.2, 0.3])
    write(a, "n4-grpo_tis-s0", [0.1, 0.2, 0.3])
    write(a, "n4-vespo-s0", [0.1, 0.25, 0.3])
    write(b, "n4-vespo-s0", [0.1, 0.25])
    proc = subprocess.run([sys.executable, "bench/testbed_run_stats.py", str(a), "--against", str(b)], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert "s0: n4-grpo-s0 vs n4-grpo_tis-s0: same reward at every step of 3; largest grad-norm difference 0" in lines
    assert "s0: n4-grpo-s0 vs n4-vespo-s0: rewards differ from step 2 of 3; largest grad-norm difference 0" in lines
    assert f"n4-vespo-s0 vs {b}: same reward at every step of 2; largest grad-norm difference 0" in lines


class _FakeSFT:
    """A trainer stand-in for train_base: each SFT step adds 1 to a weight; evaluate returns scripted pass rates."""

    def __init__(self, passes):
        import torch

        self.model = torch.nn.Linear(2, 1, bias=False)
        torch.nn.init.zeros_(self.model.weight)
        self.passes, self.evals = list(passes), []
        self.engine = type("E", (), {"sync_weights": lambda *a: None})()
        self.policy = None

    def evaluate(self, step):
        self.evals.append((step, float(self.model.weight[0, 0])))
        return {"eval/pass@1": self.passes[len(self.evals) - 1], "eval/k": 4.0}


def test_sft_base_goes_back_to_the_last_evaluation_inside_the_band(monkeypatch):
    """Round 11's base: 0.21 at step 120, 0.50 at 140 (past the 20-40 % band between two evaluations): the base
    is step 120's weights, not the overshoot's; inside the band, or with no earlier evaluation in it, no rollback."""
    import torch

    from vespo_megatron.experiments import testbed

    def fake_steps(trainer, start, n):
        with torch.no_grad():
            trainer.model.weight += n

    monkeypatch.setattr(testbed, "sft_steps", fake_steps)
    kw = dict(target=0.25, max_steps=200, eval_every=20, time_limit_s=1e9, log=lambda s: None)
    t = _FakeSFT([0.0, 0.09, 0.21, 0.50])
    rec = testbed.train_base(t, **kw)
    assert rec["stopped"] == "target" and rec["sft_steps"] == 60 and rec["eval/pass@1"] == 0.21
    assert rec["rolled_back"] == {"from_sft_step": 80, "from_pass@1": 0.5, "pass_range": [0.2, 0.4]}
    assert float(t.model.weight[0, 0]) == 60.0 == dict(t.evals)[60]  # step 60's weights, not step 80's
    assert [h["sft_step"] for h in rec["history"]] == [20, 40, 60, 80]  # the whole history stays

    t = _FakeSFT([0.0, 0.24, 0.32])  # round 8's base: stops inside the band
    rec = testbed.train_base(t, **kw)
    assert rec["sft_steps"] == 60 and rec["eval/pass@1"] == 0.32 and "rolled_back" not in rec
    assert float(t.model.weight[0, 0]) == 60.0
    t = _FakeSFT([0.0, 0.1, 0.76])  # nothing inside the band before the jump: the overshoot is the base
    rec = testbed.train_base(t, **kw)
    assert rec["sft_steps"] == 60 and rec["eval/pass@1"] == 0.76 and "rolled_back" not in rec
    assert float(t.model.weight[0, 0]) == 60.0


def _rollback_on_megatron(rank, world_size, out_dir):
    import torch

    from vespo_megatron.experiments import testbed
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training.trainer import Trainer

    cfg = train_cli.config_from_argv(["--base", "testbed", *testbed.TINY_MODEL_FLAGS, *testbed.TINY_RUN_FLAGS,
                                      "--sft-steps", "0", "--sft-lr", "1e-3", "--no-console", "--out-dir", out_dir])
    trainer = Trainer(cfg)
    try:
        passes, seen = iter([0.21, 0.5]), []

        def evaluate(step):  # scripted pass rates; the weights each evaluation saw
            seen.append([p.detach().clone() for p in trainer.model.parameters()])
            return {"eval/pass@1": next(passes)}

        trainer.evaluate = evaluate
        rec = testbed.train_base(trainer, target=0.25, max_steps=4, eval_every=2, time_limit_s=1e9, log=lambda s: None)
        now = list(trainer.model.parameters())
        return (rec["sft_steps"], rec["eval/pass@1"], all(torch.equal(a, b) for a, b in zip(now, seen[0], strict=True)),
                any(not torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True)))
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_sft_base_rollback_restores_the_megatron_model(tmp_path):
    """The rollback on the real (DDP-wrapped megatron) model: after stopping above the band, every parameter is
    bitwise the one the in-band evaluation saw, though SFT had changed them since."""
    from dist_harness import run_distributed

    steps, passed, restored, changed_since = run_distributed(_rollback_on_megatron, 1, str(tmp_path))[0]
    assert (steps, passed) == (2, 0.21) and changed_since and restored
