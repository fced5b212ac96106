"""The off-policy RL trainer: rollout engines, the toy task, the loop, checkpoints."""
