"""Loss registry: `get_policy_loss(name)` -> a callable `(inputs, normalizer, config=None) -> LossOutput`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .baselines import grpo_loss, gspo_loss, reinforce_loss, sapo_loss
from .config import GSPOConfig, PPOClipConfig, ReinforceConfig, SAPOConfig, VespoConfig
from .types import LossInputs, LossNormalizer, LossOutput
from .vespo import vespo_loss

__all__ = ["PolicyLoss", "get_policy_loss", "make_loss_config", "POLICY_LOSSES"]


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
