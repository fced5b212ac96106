"""Tiny random Hugging Face checkpoints made by `transformers` itself, shared by the model-family tests."""

from __future__ import annotations

import torch


def save_random_hf(model_cls, config, path: str, seed: int = 0):
    """`model_cls(config)` with every parameter random, norms included (weights ~ N(0, 0.08), 1-D params ~
    1 + N(0, 0.5), so that a swapped norm shows in the logits), saved in 40 KB shards to `path`."""
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 1 else 0.08) + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(path, max_shard_size="40KB")
    return model
