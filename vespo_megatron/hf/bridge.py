"""Hugging Face checkpoints of any registered model family into and out of our megatron-core model, under
any TP/EP/PP/CP/DP layout.

Who does what:
- **the model family** (`vespo_megatron.models`, chosen by the config's `model_type`) hands over its
  **mbridge** bridge (the maintained bridge library; see the README for why not Megatron-Bridge), which
  supplies the name map (megatron name -> HF names) and the tensor conversions (q/k/v into megatron's
  per-query-group fused `linear_qkv`, gate/up into the fused SwiGLU `linear_fc1`, and back). `HFBridge`
  calls exactly three of its methods; nothing else of mbridge runs (its model builder wants
  transformer-engine and its loader reads megatron's global parallel state).
- **Our layout bookkeeping** (`vespo_megatron.megatron.model.param_layout`: global layer/expert numbering,
  full shape, partition dim and stride, the group a parameter is split over) does the sharding, the same
  code that makes our weights layout independent.
- The hand-written part is a name adapter (`bridge_name`): megatron's local / non-grouped expert spec calls
  an expert weight `mlp.experts.local_experts.<e>.linear_fc1.weight` and keeps the attention norm separate
  (`input_layernorm`), where mbridge expects transformer-engine's grouped names (`linear_fc1.weight<e>`,
  `linear_qkv.layer_norm_weight`). Family-specific gaps of mbridge's maps (Qwen3-MoE's dense layers) are
  filled in the family's module.

Loading (`load_hf_weights`) reads on every rank only the tensors of its own parameters, checks each full
shape against the model, and checks across ranks that every tensor of the checkpoint was used: a
checkpoint of another architecture fails, loudly, instead of loading partially.

Saving (`save_hf_checkpoint`) gathers each parameter over its tensor-parallel group and routed experts over
the expert-parallel group; the first rank of each pipeline stage (TP rank 0, DP x CP rank 0) writes its
stage's tensors as part files; rank 0 names the shards and writes index and config. `gather_hf_tensors`
streams the same tensors to one rank (weight sync to a rollout engine).

Shape legend: V vocab, h hidden, E experts, F expert FFN size, P size of the group a tensor is split over.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator

import torch
import torch.distributed as dist

from vespo_megatron.hf.config import check_matches_hf
from vespo_megatron.hf.safetensors_io import CheckpointReader, ShardWriter, finalize_checkpoint
from vespo_megatron.megatron.model import TinyMoEConfig, full_from_shards, param_layout, shard_of_full
from vespo_megatron.megatron.parallel_setup import ParallelGroups
from vespo_megatron.models import family_for_config, get_family

__all__ = ["HFBridge", "bridge_name", "gather_hf_tensors", "hf_config_from_model", "iter_hf_tensors",
           "load_hf_weights", "save_hf_checkpoint"]

_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")


def bridge_name(global_name: str) -> str:
    """Our (global) megatron parameter name in the spelling mbridge's maps use."""
    m = _LOCAL_EXPERT.search(global_name)
    if m:
        return f"{global_name[:m.start()]}.mlp.experts.{m.group(2)}.weight{m.group(1)}"
    if global_name.endswith(".input_layernorm.weight"):  # local spec: the attention norm is its own module
        return global_name.replace(".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight")
    if global_name.endswith(".mlp.linear_fc1.layer_norm_weight"):  # TE spec, dense layer: fused pre-MLP norm
        return global_name.replace(".mlp.linear_fc1.layer_norm_weight", ".pre_mlp_layernorm.weight")
    return global_name


class HFBridge:
    """Names and conversions between our megatron parameters (full tensors) and HF tensors."""

    def __init__(self, hf_config: dict, dtype: torch.dtype = torch.float32):
        self.hf_config = dict(hf_config)
        self.dtype = dtype
        self._mb = family_for_config(self.hf_config).weight_bridge(self.hf_config, dtype)

    def hf_names(self, global_name: str) -> list[str]:
        try:
            return self._mb._weight_name_mapping_mcore_to_hf(bridge_name(global_name))
        except NotImplementedError:
            raise ValueError(f"hf bridge: no Hugging Face name for megatron parameter {global_name!r}") from None

    def to_megatron(self, global_name: str, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        return self._mb._weight_to_mcore_format(bridge_name(global_name), hf_tensors)

    def to_hf(self, global_name: str, full: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        names, tensors = self._mb._weight_to_hf_format(bridge_name(global_name), full)
        return list(zip(names, tensors, strict=True))


def hf_config_from_model(cfg: TinyMoEConfig, *, model_type: str = "qwen3_moe", torch_dtype: str = "bfloat16",
                         **extra) -> dict:
    """A `config.json` of family `model_type` for a model built from our flags (toy runs exported for SGLang /
    eval); `extra` keys are added (e.g. token ids)."""
    return get_family(model_type).hf_config(cfg, torch_dtype=torch_dtype, **extra)


def _unwrap(model):
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


@torch.no_grad()
def load_hf_weights(model, groups: ParallelGroups, path: str | os.PathLike, *, hf_config: dict,
                    model_cfg: TinyMoEConfig | None = None) -> int:
    """Copy this rank's shards of an HF checkpoint into `model`; returns the number of tensors read here.

    `model_cfg` (the flags the model was built from) is checked against `hf_config` first. Collective:
    every rank calls it.
    """
    if model_cfg is not None:
        check_matches_hf(model_cfg, hf_config, source=f"hf checkpoint {os.fspath(path)!r}")
    model = _unwrap(model)
    reader = CheckpointReader(path)
    bridge = HFBridge(hf_config, dtype=torch.float32)
    used: set[str] = set()
    for local, lay in param_layout(model, groups).items():
        param = model.get_parameter(local)
        _check_split(lay)
        names = bridge.hf_names(lay.global_name)
        full = bridge.to_megatron(lay.global_name, [reader.get(n).float() for n in names])
        if tuple(full.shape) != lay.full_shape:
            raise ValueError(f"hf checkpoint {reader.path!r}: {names} make a tensor of shape {tuple(full.shape)} "
                             f"for {lay.global_name}; the model expects {lay.full_shape}")
        if lay.partition_dim is not None:
            full = shard_of_full(full, lay.partition_dim, lay.stride, lay.group.rank(), lay.group.size())
        param.copy_(full.to(device=param.device, dtype=param.dtype))
        used.update(names)
    reader.close()
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, sorted(used))
    unused = sorted(set(reader.names()) - set().union(*map(set, everyone)))
    if unused:
        raise ValueError(f"hf checkpoint {reader.path!r}: {len(unused)} tensor(s) match no model parameter "
                         f"(another architecture?): {unused[:8]}{' ...' if len(unused) > 8 else ''}")
    return len(used)


def _check_split(lay) -> None:
    """A gated `linear_fc1` split over ranks holds [gate_r; up_r] per rank: megatron marks it with partition
    stride 2, which `shard_of_full` / `full_from_shards` need to map it to HF's separate gate / up. A module
    that splits it without saying so would be loaded wrong, silently: refuse it."""
    if lay.global_name.endswith("linear_fc1.weight") and lay.partition_dim is not None and lay.stride != 2:
        raise RuntimeError(f"hf bridge: {lay.global_name} is split over {lay.group.size()} ranks with partition "
                           f"stride {lay.stride}; expected 2 (interleaved gate/up of a SwiGLU projection)")


def _is_stage_source(groups: ParallelGroups) -> bool:
    return groups.tp_rank == 0 and groups.dp_cp.rank() == 0


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(group.size())]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


@torch.no_grad()
def iter_hf_tensors(model, groups: ParallelGroups, hf_config: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF tensors of this pipeline stage, yielded on the stage's source rank (TP 0, DP x CP 0).

    Collective: every rank of the job must exhaust the iterator (the gathers run inside it); ranks that are
    not a stage source yield nothing.
    """
    model = _unwrap(model)
    bridge = HFBridge(hf_config, dtype=torch.float32)
    source = _is_stage_source(groups)
    for local, lay in param_layout(model, groups).items():
        _check_split(lay)
        t = model.get_parameter(local).detach()
        if lay.partition_dim is not None:
            t = full_from_shards(_gather(t, lay.group), lay.partition_dim, lay.stride)
        named = [(lay.global_name, t)]
        if lay.is_expert and groups.ep_size > 1:  # every EP rank's copy of this local expert slot
            m = _LOCAL_EXPERT.search(lay.global_name)
            per_rank = model.get_submodule(local[: local.index(".local_experts.")]).num_local_experts
            first = int(m.group(1)) - groups.ep_rank * per_rank
            named = [(f"{lay.global_name[:m.start(1)]}{first + r * per_rank}{lay.global_name[m.end(1):]}", x)
                     for r, x in enumerate(_gather(t, groups.ep))]
        if source:
            for name, full in named:
                yield from bridge.to_hf(name, full)


def gather_hf_tensors(model, groups: ParallelGroups, hf_config: dict, dst: int = 0
                      ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full HF tensor of the model, yielded on global rank `dst` (a stage-0 source, e.g. rank 0).

    The other stages' sources send theirs point to point, one tensor at a time (bounded memory). Collective:
    every rank must exhaust the iterator.
    """
    me = dist.get_rank()
    roles = [None] * groups.world_size
    dist.all_gather_object(roles, (groups.pp_rank, _is_stage_source(groups)))
    if roles[dst] != (0, True):
        raise ValueError(f"gather_hf_tensors dst: expected a rank that is the source of pipeline stage 0, got "
                         f"rank {dst} with (pp_rank, source) = {roles[dst]}")
    sources = {pp: r for r, (pp, src) in enumerate(roles) if src}
    for name, t in iter_hf_tensors(model, groups, hf_config):
        if me == dst:
            yield name, t
        else:
            dist.send_object_list([(name, tuple(t.shape), t.dtype)], dst=dst)
            dist.send(t.contiguous(), dst=dst)
    if me != dst and groups.pp_rank != 0 and me == sources[groups.pp_rank]:
        dist.send_object_list([None], dst=dst)
    if me == dst:
        for pp in range(1, groups.pp_size):
            while True:
                header = [None]
                dist.recv_object_list(header, src=sources[pp])
                if header[0] is None:
                    break
                name, shape, dtype = header[0]
                buf = torch.empty(shape, dtype=dtype, device=_param_device(model))
                dist.recv(buf, src=sources[pp])
                yield name, buf


def _param_device(model) -> torch.device:
    return next(_unwrap(model).parameters()).device


def save_hf_checkpoint(model, groups: ParallelGroups, out_dir: str | os.PathLike, *, hf_config: dict,
                       source_dir: str | None = None, dtype: torch.dtype | None = None,
                       max_shard_bytes: int = 5 * 2**30) -> None:
    """Write the model as a Hugging Face checkpoint to `out_dir` (a shared file system for all ranks).

    `dtype`: the stored dtype (default: the parameters'). `source_dir`: copy tokenizer / generation config
    files from there. The directory appears complete or not at all (it is written as `<out_dir>.tmp`).
    Collective: every rank calls it.
    """
    out_dir = os.fspath(out_dir).rstrip("/")
    tmp = out_dir + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    writer = ShardWriter(tmp, f"part-r{dist.get_rank():05d}", max_shard_bytes)
    for name, t in iter_hf_tensors(model, groups, hf_config):
        writer.add(name, t if dtype is None else t.to(dtype))
    writer.flush()
    everyone = [None] * groups.world_size
    dist.all_gather_object(everyone, writer.parts)
    if dist.get_rank() == 0:
        finalize_checkpoint(tmp, out_dir, [p for parts in everyone for p in parts], hf_config, source_dir)
    dist.barrier()
