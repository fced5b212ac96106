"""One config dataclass per loss family, validated on construction (ValueError naming the field)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from vespo_megatron.base.validation import ConfigError

__all__ = [
    "AGGREGATION_MODES",
    "RolloutCorrectionConfig",
    "VespoConfig",
    "PPOClipConfig",
    "GSPOConfig",
    "SAPOConfig",
    "ReinforceConfig",
]

AggregationMode = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
ROLLOUT_CORRECTION_MODES: tuple[str, ...] = ("none", "tis", "mis", "fold", "fold_tis")
FOLD_MODES: tuple[str, ...] = ("fold", "fold_tis")



def _check_choice(cls: str, name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(cls, name, f"one of {list(choices)}", value)


def _check_epsilon(cls: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value < 1.0):
        raise ConfigError(cls, name, "a float in (0, 1)", value)


def _check_positive(cls: str, name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(cls, name, "a finite positive float", value)


@dataclass(frozen=True, kw_only=True)
class RolloutCorrectionConfig:
    """Correction for the train/inference mismatch, rho_t = pi_old_train(y_t) / pi_rollout(y_t).

    mode:  none
         | tis      truncated IS: multiply each token's loss by min(rho, upper), detached
         | mis      masked IS / rejection: tokens (token level) or whole sequences (sequence, geometric) whose
                    ratio lies outside [lower, upper] are removed *upstream* (`build_local_inputs`,
                    `parallel.sequence.build_loss_inputs`, `global_normalizer`): they leave the loss, the
                    normaliser, the per-sequence sums (log W, |y|) and every gradient
         | fold     VESPO only: log W += sum_t log rho_t (each clamped to +-20), so W = pi_theta / pi_rollout,
                    the authors' stated W (their docstring)
         | fold_tis VESPO only: log W += sum_t log max(min(rho_t, upper), 1e-8), the authors' code path (it
                    folds verl's truncated token-level TIS weight)
    level: token (per-token rho) | sequence (prod_t rho_t) | geometric (exp of mean_t log rho_t);
           fold and fold_tis are token-level by definition
    """

    mode: Literal["none", "tis", "mis", "fold", "fold_tis"] = "none"
    level: Literal["token", "sequence", "geometric"] = "token"
    upper: float = 2.0
    lower: float | None = None  # mis only; default 1 / upper

    def __post_init__(self) -> None:
        cls = "RolloutCorrectionConfig"
        _check_choice(cls, "mode", self.mode, ROLLOUT_CORRECTION_MODES)
        _check_choice(cls, "level", self.level, ("token", "sequence", "geometric"))
        if not (isinstance(self.upper, (int, float)) and math.isfinite(self.upper) and self.upper > 1.0):
            raise ConfigError(cls, "upper", "a finite float > 1", self.upper)
        if self.lower is not None and not (0.0 <= self.lower < 1.0):
            raise ConfigError(cls, "lower", "a float in [0, 1) or None", self.lower)
        if self.lower is not None and self.mode != "mis":
            raise ConfigError(cls, "lower", "None unless mode='mis'", self.lower)
        if self.mode in FOLD_MODES and self.level != "token":
            raise ConfigError(cls, "level", f"'token' with mode={self.mode!r} (the fold sums log rho_t over "
                              "tokens)", self.level)

    @property
    def effective_lower(self) -> float:
        return 1.0 / self.upper if self.lower is None else self.lower

    @property
    def shapes_inputs(self) -> bool:
        """True when the inputs must be built for this correction (rejection mask, folded sum)."""
        return self.mode in ("mis", *FOLD_MODES)


@dataclass(frozen=True, kw_only=True)
class _LossConfigBase:
    aggregation: AggregationMode = "token_mean"
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)

    def __post_init__(self) -> None:
        _check_choice(type(self).__name__, "aggregation", self.aggregation, AGGREGATION_MODES)
        if not isinstance(self.rollout_correction, RolloutCorrectionConfig):
            raise ConfigError(type(self).__name__, "rollout_correction", "a RolloutCorrectionConfig",
                       type(self.rollout_correction).__name__)
        if self.rollout_correction.mode in FOLD_MODES and not isinstance(self, VespoConfig):
            raise ConfigError(type(self).__name__, "rollout_correction.mode", "'none', 'tis' or 'mis' "
                              "('fold' and 'fold_tis' are VESPO's way and need a VespoConfig)",
                              self.rollout_correction.mode)


@dataclass(frozen=True, kw_only=True)
class VespoConfig(_LossConfigBase):
    """VESPO: phi(W) = W^c1 * exp(c2 * (1 - W)), (c1, c2) = c_pos for A >= 0 and c_neg for A < 0.

    length_norm: none (the method) | sqrt (log W / sqrt|y|, ablation) | lin (log W / |y|, ablation)
    The defaults reproduce the authors' numerics (`compute_policy_loss_vespo`): each token's log-ratio is
    clamped to +-20 *before* it is summed into log W (upstream, in the loss inputs), then
    log_w_clamp: log W (after any fold and length normalisation) is clamped to +-log_w_clamp (20);
        clamped sequences are counted in `vespo/log_w_clamped_frac`.
    w_floor: the c1 * log W term uses log max(W, w_floor) (the authors' `log(W.clamp(min=1e-8))`); 0 turns
        the floor off (the plain W^c1). Floored sequences are counted in `vespo/w_floored_frac`.
    c2_floor: c2 is raised to at least c2_floor (the authors' `lam.clamp(min=1e-4)`); 0 turns it off, so
        c2 = 0 gives the pure power phi = W^c1.
    """

    c_pos: tuple[float, float] = (2.0, 3.0)
    c_neg: tuple[float, float] = (3.0, 2.0)
    length_norm: Literal["none", "sqrt", "lin"] = "none"
    log_w_clamp: float = 20.0
    w_floor: float = 1e-8
    c2_floor: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("c_pos", "c_neg"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and len(value) == 2):
                raise ConfigError("VespoConfig", name, "a pair (c1, c2)", value)
            c1, c2 = value
            if not (math.isfinite(c1) and c1 >= 0):
                raise ConfigError("VespoConfig", f"{name}[0] (c1)", "a finite float >= 0", c1)
            if not (math.isfinite(c2) and c2 >= 0):
                raise ConfigError("VespoConfig", f"{name}[1] (c2)", "a finite float >= 0", c2)
        _check_choice("VespoConfig", "length_norm", self.length_norm, ("none", "sqrt", "lin"))
        _check_positive("VespoConfig", "log_w_clamp", self.log_w_clamp)
        if not (isinstance(self.w_floor, (int, float)) and 0.0 <= self.w_floor < 1.0):
            raise ConfigError("VespoConfig", "w_floor", "a float in [0, 1) (0: no floor)", self.w_floor)
        if not (isinstance(self.c2_floor, (int, float)) and math.isfinite(self.c2_floor) and self.c2_floor >= 0):
            raise ConfigError("VespoConfig", "c2_floor", "a finite float >= 0 (0: no floor)", self.c2_floor)
        # phi <= exp(c1 * clamp + c2) must stay inside float32.
        worst = max(c1 * self.log_w_clamp + c2 for c1, c2 in (self.c_pos, self.c_neg))
        if worst > 80.0:
            raise ConfigError("VespoConfig", "log_w_clamp", f"c1 * log_w_clamp + c2 <= 80 (phi must fit in float32; "
                       f"worst case is {worst:.1f})", self.log_w_clamp)


@dataclass(frozen=True, kw_only=True)
class PPOClipConfig(_LossConfigBase):
    """GRPO/PPO token clip with separate low/high epsilon (DAPO's clip-higher), optional dual clip."""

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None  # c > 1: bounds the loss of negative-advantage tokens by c * |A|

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_epsilon("PPOClipConfig", "eps_low", self.eps_low)
        _check_epsilon("PPOClipConfig", "eps_high", self.eps_high)
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ConfigError("PPOClipConfig", "dual_clip", "None or a float > 1", self.dual_clip)


@dataclass(frozen=True, kw_only=True)
class GSPOConfig(_LossConfigBase):
    """GSPO: sequence ratio s = exp(mean_t log(pi/mu)), clipped to [1 - eps_low, 1 + eps_high].

    gradient: token (default; verl, and the GSPO paper's GSPO-token): token t carries
                  s_t = sg[s] * pi_t / sg[pi_t], so its gradient goes through its own log pi_t and a
                  per-token weight w_t (token-level TIS) scales token t alone; no gradient flows through the
                  sequence sum, so context parallelism needs no backward collective.
              sequence: the gradient flows through s itself; token t's copy of the sequence loss times w_t
                  then gives every token the sequence mean of w. Identical to `token` whenever the weights
                  are constant within a sequence (no correction, sequence/geometric TIS).
    log_ratio_max: log s is clamped from above at this value (verl: 10; no lower clamp, exp underflows to
        0 harmlessly); clamped sequences are counted in `gspo/log_ratio_clamped_frac`.
    """

    eps_low: float = 3e-4
    eps_high: float = 4e-4
    aggregation: AggregationMode = "seq_mean_token_mean"
    gradient: Literal["token", "sequence"] = "token"
    log_ratio_max: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_epsilon("GSPOConfig", "eps_low", self.eps_low)
        _check_epsilon("GSPOConfig", "eps_high", self.eps_high)
        _check_choice("GSPOConfig", "gradient", self.gradient, ("token", "sequence"))
        _check_positive("GSPOConfig", "log_ratio_max", self.log_ratio_max)


@dataclass(frozen=True, kw_only=True)
class SAPOConfig(_LossConfigBase):
    """SAPO: soft gate f(r) = sigmoid(tau * (r - 1)) * 4 / tau on the token ratio instead of a hard clip,
    with separate temperatures for positive and negative advantages."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("SAPOConfig", "tau_pos", self.tau_pos)
        _check_positive("SAPOConfig", "tau_neg", self.tau_neg)


@dataclass(frozen=True, kw_only=True)
class ReinforceConfig(_LossConfigBase):
    """Plain REINFORCE: -A * log pi (on-policy; compose with rollout correction when off-policy)."""
