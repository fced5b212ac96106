"""Plug-ins by import path: `load_object("my_pkg.my_module:name")`, for losses, engines and estimators that
live outside the package."""

from __future__ import annotations

import importlib

from .validation import ConfigError

__all__ = ["load_object", "is_import_path"]


def is_import_path(value: object) -> bool:
    return isinstance(value, str) and value.count(":") == 1 and all(value.split(":"))


def load_object(path: str, *, what: str, known: list[str]):
    """The object at 'module:attribute'; `what` ('Owner.field') and `known` (the registered names) make the
    error say what was expected."""
    owner, _, field = what.partition(".")
    if not is_import_path(path):
        raise ConfigError(owner, field, f"one of {known} or an import path 'module:name'", path)
    module_name, attr = path.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(owner, field, f"an importable module ({e})", path) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(owner, field, f"a name defined in module {module_name!r}", path) from None
