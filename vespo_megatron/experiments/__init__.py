"""Experiment runners built on the trainer and its examples (experiments import core, never the reverse)."""

from vespo_megatron.experiments.sweep import Run, RunSummary, SweepConfig, expand, run_sweep, summarize

__all__ = ["Run", "RunSummary", "SweepConfig", "expand", "run_sweep", "summarize"]
