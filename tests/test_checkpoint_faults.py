"""Checkpoints that survive faults (issue 13), at the level of `checkpoint.py` with a small torch module and a
plain torch optimizer: truncated / deleted / partial checkpoints fall back to the newest intact one and say
so, `latest` is only a hint, keep-K pruning, full disk and unwritable out-dirs give clear errors and leave
no temporary files behind."""

from __future__ import annotations

import logging
import os
import shutil
from collections import namedtuple

import pytest
import torch

from vespo_megatron.training import checkpoint as ck

Usage = namedtuple("Usage", "total used free")


def _model_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    return model, opt


def _save(d, step, model, opt, **kw):
    with torch.no_grad():
        model.weight.fill_(float(step))
    return ck.save_checkpoint(str(d), step, model=model, optimizer=opt, extra={"s": step}, rank=0, world_size=1,
                              **kw)


def _load(d):
    model, opt = _model_opt(1)
    out = ck.load_latest_checkpoint(str(d), model=model, optimizer=opt, rank=0, world_size=1)
    return out, model


@pytest.fixture
def three(tmp_path):
    """Checkpoints at steps 1, 2, 3 under tmp_path/ckpt."""
    d = tmp_path / "ckpt"
    model, opt = _model_opt()
    for s in (1, 2, 3):
        _save(d, s, model, opt)
    return d


def _leftovers(d):
    return [p for p in d.rglob("*") if p.name.endswith((".tmp", ".part"))]


def test_roundtrip_marker(three):
    assert (three / "step_0000003" / ck.MARKER).exists()
    out, model = _load(three)
    assert out["step"] == 3 and out["extra"] == {"s": 3}
    assert torch.all(model.weight == 3.0)


def test_truncated_latest_falls_back_and_warns(three, caplog):
    f = three / "step_0000003" / "rank00000.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        out, model = _load(three)
    assert out["step"] == 2 and torch.all(model.weight == 2.0)
    assert "step_0000003" in caplog.text and "truncated" in caplog.text


def test_corrupted_same_size_falls_back(three, caplog):
    f = three / "step_0000003" / "rank00000.pt"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        out, _ = _load(three)
    assert out["step"] == 2 and "checksum" in caplog.text


def test_deleted_step_dir_uses_newest_intact(three, caplog):
    shutil.rmtree(three / "step_0000003")
    with caplog.at_level(logging.WARNING):
        out, _ = _load(three)
    assert out["step"] == 2 and "does not exist" in caplog.text


@pytest.mark.parametrize("how", ["empty", "deleted"])
def test_empty_or_deleted_latest_scans_step_dirs(three, caplog, how):
    if how == "empty":
        (three / "latest").write_text("")
    else:
        (three / "latest").unlink()
    with caplog.at_level(logging.WARNING):
        out, _ = _load(three)
    assert out is not None and out["step"] == 3
    assert ("empty" if how == "empty" else "missing") in caplog.text


def test_partial_checkpoint_without_marker_ignored(three, caplog):
    # a step directory whose rank file never got past `.part`, and no marker; `latest` points at it
    p = three / "step_0000004"
    p.mkdir()
    (p / "rank00000.pt.part").write_bytes(b"PK\x03\x04 half")
    (three / "step_0000005.tmp").mkdir()  # a save killed before its rename
    (three / "latest").write_text("step_0000004\n")
    with caplog.at_level(logging.WARNING):
        out, _ = _load(three)
    assert out["step"] == 3 and "step_0000004" in caplog.text and "partial" in caplog.text


def test_old_checkpoint_without_marker_still_loads(three):
    for s in (1, 2, 3):
        os.remove(three / f"step_000000{s}" / ck.MARKER)
    out, model = _load(three)
    assert out["step"] == 3 and torch.all(model.weight == 3.0)


def test_nothing_intact_starts_fresh(tmp_path):
    assert _load(tmp_path / "none")[0] is None


def test_world_size_mismatch_raises(three):
    model, opt = _model_opt(1)
    with pytest.raises(ValueError, match="written by 1 ranks, this run has 2"):
        ck.load_latest_checkpoint(str(three), model=model, optimizer=opt, rank=0, world_size=2)


def test_keep_k_deletes_oldest(tmp_path):
    d = tmp_path / "ckpt"
    model, opt = _model_opt()
    for s in range(1, 6):
        _save(d, s, model, opt, keep=2)
    assert sorted(p.name for p in d.iterdir() if p.is_dir()) == ["step_0000004", "step_0000005"]
    assert _load(d)[0]["step"] == 5


def test_full_disk_precheck(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    model, opt = _model_opt()
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match=r"No space left on device: .*ckpt.*needs about \d+ bytes, 100 free"):
        _save(d, 1, model, opt)
    assert _leftovers(d) == [] and not (d / "step_0000001").exists() and not (d / "latest").exists()


def test_full_disk_short_write_becomes_enospc(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    model, opt = _model_opt()
    _save(d, 1, model, opt)
    calls = []

    def usage(p):  # room at the pre-check, none once torch.save has filled the disk
        calls.append(p)
        return Usage(10**9, 0, 10**8) if len(calls) == 1 else Usage(10**9, 10**9, 0)

    def short_save(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1434")

    monkeypatch.setattr(ck.shutil, "disk_usage", usage)
    monkeypatch.setattr(ck.torch, "save", short_save)
    with pytest.raises(OSError, match=r"No space left on device \(.*step_0000002\.tmp.*0 free"):
        _save(d, 2, model, opt)
    assert _leftovers(d) == []
    monkeypatch.undo()
    assert _load(d)[0]["step"] == 1


def test_unrelated_runtime_error_passes_through_and_cleans(tmp_path, monkeypatch):
    d = tmp_path / "ckpt"
    model, opt = _model_opt()

    def boom(obj, path, *a, **k):
        open(path, "wb").close()
        raise RuntimeError("something else")

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(RuntimeError, match="something else"):
        _save(d, 1, model, opt)
    assert _leftovers(d) == []


def test_check_writable_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a 0o555 directory is still writable")
        with pytest.raises(OSError, match="not a writable directory"):
            ck.check_writable(str(ro / "run"))
    finally:
        ro.chmod(0o755)


def test_check_writable_file_in_the_way_and_free_space(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OSError, match=r"'.*f/run' is not a writable directory"):
        ck.check_writable(str(tmp_path / "f" / "run"))
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 10, 10))
    with pytest.raises(OSError, match="No space left on device: .*out.*needs about 1000 bytes, 10 free"):
        ck.check_writable(str(tmp_path / "out"), 1000)
    assert not list((tmp_path / "out").iterdir())  # the probe file is gone


def _trainer_on_unwritable_out_dir(rank, world_size, out_dir):
    from vespo_megatron.megatron.parallel_setup import destroy_parallel
    from vespo_megatron.training import cli as train_cli
    from vespo_megatron.training import trainer as trainer_mod

    def no_warm_start(_):
        raise AssertionError("the warm start ran before the out-dir check")

    trainer_mod.sft_warm_start = no_warm_start
    cfg = train_cli.config_from_argv(["--hidden-size", "32", "--num-experts", "4", "--moe-ffn-hidden-size", "32",
                                      "--steps", "1", "--sft-steps", "2", "--threads", "1", "--keep-checkpoints",
                                      "2", "--out-dir", out_dir])
    assert cfg.run.keep_checkpoints == 2
    t = trainer_mod.Trainer(cfg)
    try:
        t.run()
    except OSError as e:
        return str(e)
    finally:
        destroy_parallel()
    return "no error"


@pytest.mark.megatron
def test_trainer_checks_out_dir_before_warm_start(tmp_path):
    from dist_harness import run_distributed

    (tmp_path / "f").write_text("x")
    (msg,) = run_distributed(_trainer_on_unwritable_out_dir, 1, str(tmp_path / "f" / "run"))
    assert "not a writable directory" in msg and "f/run" in msg


def _two_ranks(rank, world_size, d):
    model, opt = _model_opt(rank)
    for s in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(10 * rank + s))
        ck.save_checkpoint(d, s, model=model, optimizer=opt, extra={}, rank=rank, world_size=world_size, keep=2)
    torch.distributed.barrier()
    if rank == 1:  # only rank 1's file of the newest is truncated: both ranks must fall back together
        f = os.path.join(d, "step_0000003", "rank00001.pt")
        os.truncate(f, os.path.getsize(f) // 2)
    torch.distributed.barrier()
    a = ck.load_latest_checkpoint(d, model=model, optimizer=opt, rank=rank, world_size=world_size)
    return sorted(os.listdir(d)), a["step"], float(model.weight[0, 0])


def test_two_ranks_keep_and_agree_on_fallback(tmp_path):
    from dist_harness import run_distributed

    d = str(tmp_path / "ckpt")
    res = run_distributed(_two_ranks, 2, d)
    # keep=2 left steps 2 and 3; step 3's rank-1 file is truncated: both ranks fall back to step 2
    assert res == [(["latest", "step_0000002", "step_0000003"], 2, 2.0),
                   (["latest", "step_0000002", "step_0000003"], 2, 12.0)]


# ------------------------------------------------------------------ real file systems (tmpfs), where root may mount


@pytest.fixture
def tmpfs(tmp_path):
    """mount(opts) -> a fresh tmpfs at a new directory under tmp_path, unmounted afterwards; skips where mounting
    is not allowed (not root, or a sandbox without CAP_SYS_ADMIN)."""
    import subprocess

    mounted = []

    def mount(opts: str):
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_read_only_file_system_fails_at_start(tmpfs):
    ro = tmpfs("ro,size=1m")
    with pytest.raises(OSError, match=r"not a writable directory.*Read-only file system"):
        ck.check_writable(str(ro / "run"))


def test_really_full_disk_says_no_space_and_cleans_up(tmpfs):
    small = tmpfs("size=48k")
    d = small / "ckpt"
    model, opt = _model_opt()
    torch.manual_seed(0)
    big = torch.nn.Linear(64, 256)  # ~66 KB of fp32 weights: more than the file system holds
    big_opt = torch.optim.Adam(big.parameters())
    _save(d, 1, model, opt)  # a small checkpoint fits
    with pytest.raises(OSError, match="No space left on device"):
        ck.save_checkpoint(str(d), 2, model=big, optimizer=big_opt, extra={}, rank=0, world_size=1)
    assert _leftovers(d) == []
    assert _load(d)[0]["step"] == 1  # the previous checkpoint is intact
