"""Policy losses as pure functions on local tensors (no torch.distributed, no global parallel state).

Entry points: `vespo_phi`, `get_policy_loss(name)`, `LossInputs`, `LossNormalizer`, the config classes,
and `build_local_inputs` for single-process callers.
"""

from .aggregation import aggregate, token_weights
from .config import (
    AGGREGATION_MODES,
    GSPOConfig,
    PPOClipConfig,
    ReinforceConfig,
    RolloutCorrectionConfig,
    SAPOConfig,
    VespoConfig,
)
from .inputs import build_local_inputs, inputs_from_sums, loss_sums
from .registry import (
    POLICY_LOSSES,
    LossConfig,
    PolicyLoss,
    get_policy_loss,
    make_loss_config,
    resolve_policy_loss,
)
from .segments import masked_segment_sum, segment_count
from .types import LossInputs, LossNormalizer, LossOutput
from .vespo import vespo_loss, vespo_phi

__all__ = [
    "AGGREGATION_MODES", "GSPOConfig", "PPOClipConfig", "ReinforceConfig", "RolloutCorrectionConfig",
    "SAPOConfig", "VespoConfig", "LossInputs", "LossNormalizer", "LossOutput",
    "POLICY_LOSSES", "LossConfig", "PolicyLoss", "get_policy_loss", "resolve_policy_loss", "make_loss_config",
    "vespo_phi", "vespo_loss", "aggregate", "token_weights", "build_local_inputs", "loss_sums", "inputs_from_sums",
    "masked_segment_sum", "segment_count",
]
