"""Mismatch metrics, batch statistics and the logging sinks.

`mismatch_metrics` and friends are pure functions returning `Metric`s (reduce them like the loss metrics);
`MetricsLogger` sends the finalized numbers to the console, a JSONL file and Weights & Biases (rank 0 only);
`python -m vespo_megatron.metrics.plot RUN.jsonl --out DIR` draws a run's curves (needs matplotlib).
"""

from .mismatch import (
    LOG_RATIO_CAP,
    derive_mismatch,
    entropy_metrics,
    finalize_mismatch,
    mismatch_metrics,
    response_stats,
    staleness_histogram,
)
from .sinks import ConsoleSink, JsonlSink, LoggingConfig, MetricsLogger, Sink, WandbSink

__all__ = [
    "LOG_RATIO_CAP", "derive_mismatch", "entropy_metrics", "finalize_mismatch", "mismatch_metrics",
    "response_stats", "staleness_histogram", "ConsoleSink", "JsonlSink", "LoggingConfig", "MetricsLogger",
    "Sink", "WandbSink",
]
