"""Test doubles shipped with the package (usable by tests and examples): a fake SGLang HTTP server."""

from vespo_megatron.testing.fake_sglang import (
    CORRUPTIONS,
    FakeOutput,
    FakeRequest,
    FakeSGLangServer,
    hash_policy,
)

__all__ = ["CORRUPTIONS", "FakeOutput", "FakeRequest", "FakeSGLangServer", "hash_policy"]
