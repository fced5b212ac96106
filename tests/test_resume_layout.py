"""Resuming under another parallel layout (issue 13): the checkpoint marker records the layout, and a run with
another one gets a message naming both layouts and the flags to resume with, before any raw state_dict
mismatch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.training import checkpoint as ck


class _Megatron(torch.nn.Module):
    """A small module carrying a megatron-like config (the sizes `layout_of` reads)."""

    def __init__(self, out: int, *, tp=1, ep=1, pp=1, sp=False, cp=1, vpp=None):
        super().__init__()
        self.linear = torch.nn.Linear(8, out)
        self.config = SimpleNamespace(tensor_model_parallel_size=tp, sequence_parallel=sp, context_parallel_size=cp,
                                      expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                      pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)


class _Wrapper(torch.nn.Module):  # like DDP: the megatron module is .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def _save(d, model, world_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ck.save_checkpoint(str(d), 3, model=model, optimizer=opt, extra={}, rank=0, world_size=world_size)


def _load(d, model, world_size):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return ck.load_latest_checkpoint(str(d), model=model, optimizer=opt, rank=0, world_size=world_size)


def test_marker_records_the_layout(tmp_path):
    path = _save(tmp_path, _Wrapper(_Megatron(4, ep=2)), 2)
    marker = json.loads(open(f"{path}/{ck.MARKER}").read())
    assert marker["layout"] == {"tp": 1, "sp": False, "cp": 1, "ep": 2, "etp": 1, "pp": 1, "vpp": None,
                                "world_size": 2}


def test_resume_under_another_layout_names_both(tmp_path):
    _save(tmp_path, _Wrapper(_Megatron(4, ep=2)), 2)
    # Another layout shards differently (here: another shape); the hint comes before any state_dict mismatch.
    with pytest.raises(ck.LayoutMismatch) as info:
        _load(tmp_path, _Wrapper(_Megatron(2, tp=2, sp=True)), 2)
    msg = str(info.value)
    assert msg.startswith("checkpoint step_0000003 was written with TP1 EP2 PP1 (world 2); this run is "
                          "TP2 SP EP1 PP1 (world 2): resume with the same layout (--tp 1 --ep 2 --pp 1 on 2 ranks)")


def test_resume_under_another_world_size_names_the_layout(tmp_path):
    _save(tmp_path, _Megatron(4, ep=2), 2)
    with pytest.raises(ck.LayoutMismatch, match=r"written with TP1 EP2 PP1 \(world 2\); this run is TP1 EP1 PP1 "
                                                r"\(world 1\)"):
        _load(tmp_path, _Megatron(4), 1)
    # A model without a megatron config: only the world size is known on this side.
    with pytest.raises(ck.LayoutMismatch, match=r"written by 2 ranks \(TP1 EP2 PP1 \(world 2\)\), this run has 1"):
        _load(tmp_path, torch.nn.Sequential(torch.nn.Linear(8, 4)), 1)


def test_same_layout_resumes(tmp_path):
    _save(tmp_path, _Wrapper(_Megatron(4, ep=2, pp=2, vpp=2)), 2)
    out = _load(tmp_path, _Wrapper(_Megatron(4, ep=2, pp=2, vpp=2)), 2)
    assert out["step"] == 3


def test_describe_layout():
    layout = {"tp": 2, "sp": True, "cp": 2, "ep": 4, "etp": 1, "pp": 2, "vpp": 2, "world_size": 16}
    assert ck.describe_layout(layout) == "TP2 SP CP2 EP4 PP2 VPP2 (world 16)"
