"""The ground floor: what every layer shares and nothing here imports from the rest of the package.

`metric`: metrics that carry their reduction; `validation`: the one way a config reports a bad field.
"""

from .metric import EMPTY_EXTREME, Metric, Reduce, finalize_metrics, merge_metrics
from .validation import ConfigError

__all__ = ["EMPTY_EXTREME", "Metric", "Reduce", "finalize_metrics", "merge_metrics", "ConfigError"]
