"""Command lines generated from a config dataclass tree: one flag per leaf field, one default per field.

A run is a base config instance (e.g. `examples/toy_rl.py`'s `toy_config()`); `ConfigCLI(base, ...)` walks
its dataclass tree and makes a flag for every leaf field, named `--<field-name>` unless `flags` names it
otherwise (a name used twice in the tree must be named). The default of every flag is the base config's
value, shown by `--help`; flags a user gives are applied on top of the base and the result re-validated
by the dataclasses themselves, so a flag has no default of its own.

Fields typed as a union of dataclasses (the task, the loss config) are chosen by a selector: `selectors`
maps the field's path to (flag, choose), where `choose(value)` returns the member class (or a ready
instance) for the flag's value; without the flag, the member whose flags were given is taken (the base's
member when none were). Flags of a member that is not chosen are refused, naming the member.

A `ConfigError` raised while building names the command-line flag of the field, not the dataclass field; so
does a plain `ValueError` whose message starts `Owner.field: ` (the convention older configs follow).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vespo_megatron.base.validation import ConfigError

__all__ = ["Leaf", "ConfigCLI", "CLIError"]

_MISSING = object()
_OWNER_FIELD = re.compile(r"^([A-Z]\w*)\.(\w+): ")  # "Owner.field: expected ..., got ..."


class CLIError(ValueError):
    """A command-line error that names the flag (printed as one line by the example scripts)."""


@dataclass
class Leaf:
    path: str  # dotted path in the tree, e.g. "rollout.embedded.precision"
    owner: type  # the dataclass that holds the field
    field: dataclasses.Field
    flag: str
    member_of: tuple[str, set[type]] | None  # (union field path, member classes that have it) in a union


def _dataclass_members(tp) -> list[type] | None:
    """The dataclass members of a union type (None members dropped), or None if it is no such union."""
    origin = typing.get_origin(tp)
    if origin not in (typing.Union, types.UnionType):
        return None
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    return members if members and all(dataclasses.is_dataclass(m) for m in members) else None


def _scalar_parser(tp) -> tuple[Callable[[str], Any] | None, tuple | None, int | None]:
    """(parse, choices, nargs) for a leaf type; parse None: not settable from the command line."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _scalar_parser(inner[0])
        if str in inner:  # str | Path and the like: read as a string
            return str, None, None
        return None, None, None
    if origin is Literal:
        return str, tuple(args), None
    if origin is tuple and len(args) == 2 and args[0] is args[1] and args[0] in (int, float):
        return args[0], None, 2
    if tp in (int, float, str):
        return tp, None, None
    return None, None, None


class ConfigCLI:
    """argparse for the tree of `base`. `flags`: path -> flag name; `groups`: top-level field -> the help
    group it is listed under; `hidden`: paths not offered (derived by the run); `converters`: path ->
    (parse, show, choices) for types argparse cannot read directly (a torch dtype, say)."""

    def __init__(self, base, *, flags: dict[str, str] | None = None, groups: dict[str, str] | None = None,
                 hidden: Sequence[str] = (), selectors: dict[str, tuple[str, Callable[[str], Any]]] | None = None,
                 converters: dict[str, tuple[Callable[[str], Any], Callable[[Any], str], tuple | None]] | None = None,
                 helps: dict[str, str] | None = None):
        self.base = base
        self._flags = dict(flags or {})
        self._groups = dict(groups or {})
        self._hidden = set(hidden)
        self._selectors = dict(selectors or {})
        self._converters = dict(converters or {})
        self._helps = dict(helps or {})
        self.leaves: dict[str, Leaf] = {}
        self._walk(type(base), base, "", None)
        by_flag: dict[str, str] = {}
        for leaf in self.leaves.values():
            if leaf.flag in by_flag:
                raise ValueError(f"flags {by_flag[leaf.flag]!r} and {leaf.path!r} are both {leaf.flag}: name one "
                                 "in `flags`")
            by_flag[leaf.flag] = leaf.path
        self._by_owner = {}
        for leaf in self.leaves.values():
            for owner in leaf.member_of[1] if leaf.member_of else (leaf.owner,):
                self._by_owner[(owner.__name__, leaf.field.name)] = leaf

    # ------------------------------------------------------------------ the tree

    def _walk(self, cls: type, value, prefix: str, member_of) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = prefix + f.name
            if path in self._hidden or not f.init:
                continue
            tp = hints[f.name]
            current = getattr(value, f.name, _MISSING) if value is not None else _MISSING
            members = _dataclass_members(tp)
            if members is not None:
                for m in members:
                    same = current if isinstance(current, m) else None
                    self._walk(m, same, path + ".", (path, m))
                continue
            if dataclasses.is_dataclass(tp):
                self._walk(tp, current if current is not _MISSING else None, path + ".", member_of)
                continue
            optional_bool = typing.get_args(tp) == (bool, type(None))  # --x / --no-x, None when neither is given
            if path not in self._converters and _scalar_parser(tp)[0] is None and tp is not bool and not optional_bool:
                continue  # not a command-line type (a mapping, a spec object): set it in the run's config
            if path in self.leaves and member_of is not None:  # a field several union members share
                self.leaves[path].member_of[1].add(member_of[1])
                continue
            flag = self._flags.get(path, "--" + f.name.replace("_", "-"))
            self.leaves[path] = Leaf(path, cls, f, flag, None if member_of is None else (member_of[0], {member_of[1]}))

    # ------------------------------------------------------------------ argparse

    def _base_value(self, leaf: Leaf):
        obj = self.base
        for part in leaf.path.split("."):
            obj = getattr(obj, part, _MISSING)
            if obj is _MISSING:
                return _MISSING
        return obj

    def build_parser(self, description: str | None = None, *, extra: Callable | None = None) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                    argument_default=argparse.SUPPRESS)
        sections: dict[str, argparse._ArgumentGroup] = {}

        def section(path: str):
            title = self._groups.get(path.split(".")[0], path.split(".")[0])
            if title not in sections:
                sections[title] = p.add_argument_group(title)
            return sections[title]

        for path, (flag, _) in self._selectors.items():
            if flag not in self.leaves:  # a selector of its own (else a leaf field's value selects)
                section(path).add_argument(flag, dest="select:" + path,
                                           help=self._helps.get(flag, f"which {path} config"))
        for leaf in self.leaves.values():
            tp = typing.get_type_hints(leaf.owner)[leaf.field.name]
            default = self._base_value(leaf)
            help_text = self._helps.get(leaf.path, "")
            if leaf.member_of is not None and default is _MISSING:
                shown = f"(with {' / '.join(sorted(m.__name__ for m in leaf.member_of[1]))})"
            else:
                show = self._converters[leaf.path][1] if leaf.path in self._converters else repr
                shown = f"(default: {show(default)})"
            kwargs: dict[str, Any] = {"dest": leaf.path, "help": f"{help_text} {shown}".strip()}
            if tp is bool or (leaf.path not in self._converters and typing.get_args(tp) == (bool, type(None))):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif leaf.path in self._converters:
                parse, _, choices = self._converters[leaf.path]
                kwargs.update(type=parse, choices=choices, metavar=leaf.field.name.upper())
            else:
                parse, choices, nargs = _scalar_parser(tp)
                kwargs.update(type=parse, choices=choices, nargs=nargs)
                if choices is None:
                    kwargs["metavar"] = leaf.field.name.upper()
                if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
                    kwargs["type"] = _optional(parse)
            section(leaf.path).add_argument(leaf.flag, **kwargs)
        if extra is not None:
            extra(p)
        return p

    # ------------------------------------------------------------------ building the config

    def config_from(self, ns: argparse.Namespace, base=None):
        """`base` (default: the CLI's) with the given flags applied; a bad value raises CLIError naming the
        flag."""
        given = {k: v for k, v in vars(ns).items() if k in self.leaves}
        chosen = {}
        for path, (flag, _) in self._selectors.items():
            if flag in self.leaves and flag in given:
                chosen[path] = given[flag]
            elif hasattr(ns, "select:" + path):
                chosen[path] = getattr(ns, "select:" + path)
        try:
            base = self.base if base is None else base
            return self._rebuild(base, type(base), "", given, chosen)
        except ValueError as e:  # ConfigError, or a config's own "Owner.field: ..." ValueError
            raise self.restate(e) from None

    def restate(self, e: ValueError) -> ValueError:
        """A config's error in the command line's terms: a `ConfigError`, or a ValueError whose message starts
        with `Owner.field: `, names the flag (CLIError); any other ValueError comes back unchanged."""
        if isinstance(e, CLIError):
            return e
        if isinstance(e, ConfigError):
            return self.named(e)
        m = _OWNER_FIELD.match(str(e))
        leaf = self._by_owner.get((m.group(1), m.group(2))) if m else None
        return CLIError(f"{leaf.flag}: {str(e)[m.end():]}") if leaf is not None else e

    def named(self, e: ConfigError) -> CLIError:
        """`e` restated with the flag of its field (when the field has one)."""
        leaf = self._by_owner.get((e.owner, e.field.split("[")[0].split(" ")[0]))
        where = leaf.flag if leaf is not None else f"{e.owner}.{e.field}"
        return CLIError(f"{where}: expected {e.expected}, got {e.got!r}")

    def _member(self, path: str, current, members: list[type], given: dict, chosen: dict):
        """(class, starting instance or None) of the union field at `path`."""
        if path in chosen:
            flag, choose = self._selectors[path]
            picked = choose(chosen[path])
            if dataclasses.is_dataclass(picked) and not isinstance(picked, type):
                return type(picked), picked
            return picked, current if isinstance(current, picked) else None
        used = [self.leaves[p].member_of[1] for p in given if self.leaves[p].member_of
                and self.leaves[p].member_of[0] == path]
        if current is not None and all(type(current) in u for u in used):
            return type(current), current
        common = set(members).intersection(*used)
        if len(common) == 1:
            return common.pop(), None
        sel = self._selectors.get(path, ("--" + path,))[0]
        sel = self.leaves[sel].flag if sel in self.leaves else sel
        names = sorted(m.__name__ for m in (set().union(*used) if not common else common))
        if not common:
            raise CLIError(f"{sel}: the flags given belong to different configs ({', '.join(names)}); choose one")
        raise CLIError(f"{sel}: the flags given apply to {' / '.join(names)}; choose one with {sel}")

    def _rebuild(self, obj, cls: type, prefix: str, given: dict, chosen: dict):
        hints = typing.get_type_hints(cls)
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            path = prefix + f.name
            if not f.init:
                continue
            current = getattr(obj, f.name) if obj is not None else _MISSING
            members = _dataclass_members(hints[f.name])
            if members is not None:
                member, start = self._member(path, current if current is not _MISSING else None, members,
                                             given, chosen)
                for p in given:
                    leaf = self.leaves[p]
                    if leaf.member_of and leaf.member_of[0] == path and member not in leaf.member_of[1]:
                        owners = " / ".join(sorted(m.__name__ for m in leaf.member_of[1]))
                        raise CLIError(f"{leaf.flag}: applies to {owners}, and this run uses {member.__name__}")
                new = self._rebuild(start, member, path + ".", given, chosen)
                if new is not current:
                    changes[f.name] = new
            elif dataclasses.is_dataclass(hints[f.name]):
                sub = current if current is not _MISSING else None
                new = self._rebuild(sub, hints[f.name], path + ".", given, chosen)
                if new is not current:
                    changes[f.name] = new
            elif path in given:
                value = given[path]
                changes[f.name] = tuple(value) if isinstance(value, list) else value
        if obj is None:
            try:
                return cls(**changes)
            except TypeError as e:  # a required field nobody gave
                missing = [f for f in dataclasses.fields(cls) if f.name not in changes and f.init
                           and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
                flags = [self.leaves[prefix + f.name].flag if prefix + f.name in self.leaves else prefix + f.name
                         for f in missing]
                raise CLIError(f"{', '.join(flags)}: required for {cls.__name__} ({e})") from None
        return dataclasses.replace(obj, **changes) if changes else obj

    def explicit(self, ns: argparse.Namespace) -> set[str]:
        """The paths of the fields whose flags were given."""
        return {k for k in vars(ns) if k in self.leaves}


def _optional(parse):
    def read(text: str):
        return None if text.lower() == "none" else parse(text)

    read.__name__ = getattr(parse, "__name__", "value")
    return read
