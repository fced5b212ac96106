"""Model families: one module per Hugging Face architecture, found by its config.json `model_type`.

`hf/` (checkpoints), `routing/` (the routing spec) and `planning/` (parameter counts) ask the family of a
config instead of knowing any architecture themselves. Adding a family: a module with a `ModelFamily`
subclass (see `family.py`; `mixtral.py` is a short example) and its line in `FAMILIES`.

This is also the one place that reads a checkpoint's `config.json` (`load_hf_config`). Pure Python at
import time (see `family.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from vespo_megatron.base.validation import ConfigError
from vespo_megatron.models.family import ModelFamily, hf_field
from vespo_megatron.models.mixtral import Mixtral
from vespo_megatron.models.qwen3_moe import Qwen3MoE
from vespo_megatron.models.shape import ModelShape

__all__ = ["FAMILIES", "PRESETS", "ModelFamily", "ModelShape", "family_for_config", "get_family",
           "load_hf_config", "preset_config"]

FAMILIES: dict[str, ModelFamily] = {
    Qwen3MoE.model_type: Qwen3MoE(),
    Mixtral.model_type: Mixtral(),
}

# Published configs of every family by name ("qwen3-30b-a3b", ...): config.json dicts.
PRESETS: dict[str, Mapping[str, Any]] = {name: cfg for f in FAMILIES.values() for name, cfg in f.presets.items()}


def get_family(model_type: object) -> ModelFamily:
    if model_type not in FAMILIES:
        raise ConfigError("hf_config", "model_type", f"one of the registered model families {sorted(FAMILIES)}",
                          model_type)
    return FAMILIES[model_type]


def family_for_config(cfg: Any) -> ModelFamily:
    """The family of a config.json dict or a transformers config (by its `model_type`)."""
    return get_family(hf_field(cfg, "model_type"))


def preset_config(name: str) -> dict:
    """A copy of a published config by preset name (e.g. for `model_config_from_hf`)."""
    if name not in PRESETS:
        raise ConfigError("models", "preset", f"one of {sorted(PRESETS)}", name)
    return dict(PRESETS[name])


def load_hf_config(path: str | os.PathLike) -> dict:
    """A checkpoint directory's (or a file's) `config.json` as a dict, of a registered family; clear errors
    for a missing, malformed or foreign config."""
    path = os.fspath(path)
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f"hf checkpoint: expected a config.json in {path!r}, found none")
    with open(file) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"hf checkpoint: {file} is not valid JSON ({e})") from None
    try:
        family_for_config(cfg)
    except ConfigError as e:
        raise ValueError(f"{file}: {e}") from None
    return cfg
