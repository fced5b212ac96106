"""Loss registry: `get_policy_loss(name)` -> a callable `(inputs, normalizer, config=None) -> LossOutput`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vespo_megatron.base.imports import load_object

from .baselines import grpo_loss, gspo_loss, reinforce_loss, sapo_loss
from .config import GSPOConfig, PPOClipConfig, ReinforceConfig, SAPOConfig, VespoConfig
from .types import LossInputs, LossNormalizer, LossOutput
from .vespo import vespo_loss

__all__ = ["PolicyLoss", "get_policy_loss", "make_loss_config", "resolve_policy_loss", "LossConfig", "POLICY_LOSSES"]

# The typed configs of the registered losses; a loss name selects its member (`PolicyLoss.config_cls`).
LossConfig = VespoConfig | PPOClipConfig | GSPOConfig | SAPOConfig | ReinforceConfig


@dataclass(frozen=True)
class PolicyLoss:
    """A named loss: its function, its config class and the config fields its name fixes."""

    name: str
    fn: Callable[..., LossOutput]
    config_cls: type
    fixed: dict[str, Any]
    # config -> whether the loss differentiates through the sequence log-ratio (needs the autograd all-reduce)
    seq_grad: Callable[[Any], bool] = lambda config: False

    def default_config(self, **overrides: Any):
        for key, value in self.fixed.items():
            if key in overrides and overrides[key] != value:
                raise ValueError(f"{self.name}: config field {key!r} is fixed to {value!r} by the loss name, "
                                 f"got {overrides[key]!r}")
        return self.config_cls(**{**self.fixed, **overrides})

    def __call__(self, inputs: LossInputs, normalizer: LossNormalizer, config=None) -> LossOutput:
        if config is None:
            config = self.default_config()
        elif not isinstance(config, self.config_cls):
            raise ValueError(f"{self.name}: config must be a {self.config_cls.__name__}, got {type(config).__name__}")
        else:
            for key, value in self.fixed.items():
                if getattr(config, key) != value:
                    config = dataclasses.replace(config, **{key: value})
        return self.fn(inputs, normalizer, config)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "vespo": PolicyLoss("vespo", vespo_loss, VespoConfig, {"length_norm": "none"}),
    "vespo_sqrt": PolicyLoss("vespo_sqrt", vespo_loss, VespoConfig, {"length_norm": "sqrt"}),
    "vespo_lin": PolicyLoss("vespo_lin", vespo_loss, VespoConfig, {"length_norm": "lin"}),
    "grpo": PolicyLoss("grpo", grpo_loss, PPOClipConfig, {}),
    "gspo": PolicyLoss("gspo", gspo_loss, GSPOConfig, {}, seq_grad=lambda config: config.gradient == "sequence"),
    "sapo": PolicyLoss("sapo", sapo_loss, SAPOConfig, {}),
    "reinforce": PolicyLoss("reinforce", reinforce_loss, ReinforceConfig, {}),
}


def get_policy_loss(name: str) -> PolicyLoss:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"policy loss name: expected one of {sorted(POLICY_LOSSES)}, got {name!r}") from None


def make_loss_config(name: str, **overrides: Any):
    """The config for loss `name` with its defaults, `overrides` applied and validated."""
    return get_policy_loss(name).default_config(**overrides)


def resolve_policy_loss(name: str) -> PolicyLoss:
    """A registered loss by name, or one from outside the package by import path 'module:build', where
    `build()` returns a `PolicyLoss` (e.g. `PolicyLoss("my_loss", fn, VespoConfig, {})`)."""
    if name in POLICY_LOSSES:
        return POLICY_LOSSES[name]
    build = load_object(name, what="AlgorithmConfig.loss", known=sorted(POLICY_LOSSES))
    loss = build()
    if not isinstance(loss, PolicyLoss):
        raise ValueError(f"AlgorithmConfig.loss: expected {name!r} to build a PolicyLoss, got {type(loss).__name__}")
    return loss
