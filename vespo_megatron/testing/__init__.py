"""Test doubles shipped with the package (usable by tests and examples): a fake SGLang HTTP server
(runnable: ``python -m vespo_megatron.testing.fake_sglang --port P``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["CORRUPTIONS", "FakeOutput", "FakeRequest", "FakeSGLangServer", "hash_policy"]

if TYPE_CHECKING:
    from vespo_megatron.testing.fake_sglang import (
        CORRUPTIONS,
        FakeOutput,
        FakeRequest,
        FakeSGLangServer,
        hash_policy,
    )


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m vespo_megatron.testing.fake_sglang` does not import the module twice.
    if name in __all__:
        return getattr(importlib.import_module("vespo_megatron.testing.fake_sglang"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
