"""Typed configuration: dataclasses loaded from YAML with `key.sub=value` overrides, unknown keys rejected.

The machinery here is generic (`from_dict`, `apply_overrides`, `load`); the sections live next to the code
they configure and are composed into the top-level `Config` below.

A config is plain data, and it is checked as such before anything else reads it: YAML aliases (which can
expand exponentially, "billion laughs", when the config is copied or dumped) and explicit tags (`!!binary`,
`!!python/...`) are refused, as are files over MAX_CONFIG_BYTES, values over MAX_VALUE_CHARS characters and
nesting deeper than MAX_DEPTH; every such error, and every malformed override, is one line naming the key
or the file's line, and quotes a value only in part.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from copg_jax import paths

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20
MAX_VALUE_CHARS = 4096
MAX_DEPTH = 32
# Seeds become JAX PRNG keys, which take 32 bits (without jax_enable_x64): 2^32 + k made key k.
MAX_SEED = 2**32
# Plain numbers YAML 1.1 reads otherwise than they read: a leading zero as octal (010 is 8), colons in base
# 60 (1:30 is 90). Refused, whatever the key (a quoted value stays text).
_OTHER_BASE = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key."""


def show(value: Any, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters (a 20 MB value is not echoed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


class _PlainLoader(yaml.SafeLoader):
    """YAML's safe loader without aliases, explicit tags or a key given twice in one mapping (which YAML
    would let the last one win silently: a second `train:` block replacing the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                self.construct_mapping_key_check(key_node)
                key = self.construct_object(key_node, deep=deep)
                line = key_node.start_mark.line + 1
                try:
                    if key in first:
                        raise ConfigError(
                            f"key {show(key, 40)} given twice in one mapping (lines {first[key]} and {line})"
                        )
                    first[key] = line
                except TypeError:  # an unhashable key: the base class names it
                    break
        return super().construct_mapping(node, deep=deep)

    def construct_mapping_key_check(self, key_node) -> None:
        if key_node.tag == "tag:yaml.org,2002:merge":
            line = key_node.start_mark.line + 1
            raise ConfigError(f"YAML merge key << (line {line}): merge keys are not allowed in a config")

    def construct_number(self, node):
        """A plain int or float scalar, refusing those YAML 1.1 reads in another base (`_OTHER_BASE`)."""
        text = self.construct_scalar(node)
        if _OTHER_BASE.fullmatch(text):
            line = node.start_mark.line + 1
            kind, mend = ("in base 60", "colons") if ":" in text else ("as octal", "the leading zero")
            raise ConfigError(
                f"{show(text, 40)} (line {line}): YAML 1.1 reads this number {kind}: write it without "
                f"{mend}, or quote it to keep it as text"
            )
        if node.tag.endswith(":int"):
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)

    def compose_node(self, parent, index):
        event = self.peek_event()
        line = event.start_mark.line + 1
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"YAML alias *{event.anchor} (line {line}): aliases are not allowed in a config"
            )
        if getattr(event, "tag", None) is not None:
            raise ConfigError(
                f"YAML tag {show(event.tag, 40)} (line {line}): tags are not allowed in a config"
            )
        return super().compose_node(parent, index)


_PlainLoader.add_constructor("tag:yaml.org,2002:int", _PlainLoader.construct_number)
_PlainLoader.add_constructor("tag:yaml.org,2002:float", _PlainLoader.construct_number)


def _check_plain(value: Any, where: str, depth: int = 0) -> None:
    """Raises ConfigError for a value nested over MAX_DEPTH deep or holding a string over MAX_VALUE_CHARS."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
        raise ConfigError(f"{where}: a value of {len(value)} characters (more than {MAX_VALUE_CHARS})")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        _check_plain(key, where, depth + 1)
        _check_plain(item, f"{where}.{key}" if isinstance(value, dict) else f"{where}[{key}]", depth + 1)


def parse_yaml(text: str, where: str) -> Any:
    """Plain YAML data (see the module docstring) from `text`; errors are one-line ConfigErrors naming
    `where` and the line."""
    try:
        data = yaml.load(text, Loader=_PlainLoader)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep") from None
    _check_plain(data, where)
    return data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks (and minimally converts) `value` against the annotation `tp`; `key` is the dotted path."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {show(value)} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {show(value)} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {show(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return origin(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {show(value)}")
        key_tp, item_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, f"{key} key"): _coerce(v, item_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string: accept it as a number
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {show(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):  # no setting means anything with nan/inf; they would end as a nan loss
            raise ConfigError(f"{key}: expected a finite number, got {show(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            quote = " (YAML reads {...} and [...] as a mapping and a list: quote the text)" * isinstance(
                value, dict | list
            )
            raise ConfigError(f"{key}: expected a string, got {show(value)}{quote}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value)}")
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, prefix: str = "") -> T:
    """Builds dataclass `cls` from a (nested) mapping; unknown keys and mistyped values raise ConfigError."""
    data = {} if data is None else data
    where = prefix or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {show(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        full = show(f"{prefix}.{key}" if prefix else str(key))
        raise ConfigError(f"unknown config key {full}{hint}; valid keys under {where}: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        full = f"{prefix}.{missing[0]}" if prefix else missing[0]
        raise ConfigError(f"{where}: the required key {full!r} is missing")
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a section's own __post_init__ (missing keys are named above)
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError:
        raise
    except ValueError as e:  # the section's own validation (__post_init__)
        raise ConfigError(in_section(str(e), prefix)) from None
    return obj


def in_section(message: str, prefix: str) -> str:
    """A section's validation `message` placed under `prefix`, where the section sits in the whole config: a
    message naming the section by its own name ("reward.sandbox=...") names it by its full key
    ("eval_generation.reward.sandbox=..."); another gets `prefix: ` in front."""
    if not prefix:
        return message
    head = re.match(r"\w+", message)
    if head and head.group() == prefix.rsplit(".", 1)[-1]:
        return prefix + message[head.end() :]
    return f"{prefix}: {message}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for saving next to a run)."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `a.b.c=value` overrides (values parsed as plain YAML) to a nested dict, in order."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {show(item)} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts) or len(key) > 200:
            raise ConfigError(f"override {show(item)} has an empty or overlong key")
        if len(raw) > MAX_VALUE_CHARS:
            raise ConfigError(
                f"override {key}: a value of {len(raw)} characters (more than {MAX_VALUE_CHARS})"
            )
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ConfigError(f"override {key}: {section} is {show(child, 40)}, not a section of keys")
            child = dict(child or {})
            node[part] = child
            node = child
        value = _override_value(raw, key)
        if value is None and isinstance(node.get(parts[-1]), dict) and node[parts[-1]]:
            raise ConfigError(  # null for a section means its defaults: the settings given would go
                f"override {key}=null would reset {key} to its defaults, dropping the settings the config "
                "file or an earlier override gave it; set its keys instead ({} for an empty mapping)"
            )
        node[parts[-1]] = value
    return data


def _override_value(raw: str, key: str) -> Any:
    """The value of override `key=raw` as plain YAML ("" for an empty one); a YAML comment in it (" #" after
    an unquoted value) is refused, as it would silently cut the value."""
    if not raw.strip():
        return ""
    value = parse_yaml(raw, f"override {key}")
    try:
        node = yaml.compose(raw, Loader=_PlainLoader)
    except yaml.YAMLError:  # parse_yaml accepted it: no reason to refuse it here
        return value
    end = len(raw.rstrip())
    if node is not None and node.end_mark.index < end:
        raise ConfigError(
            f"override {key}: {show(raw[node.end_mark.index :].strip(), 40)} is a YAML comment that would "
            f"cut the value to {show(value, 40)}; quote the value to keep it"
        )
    return value


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Loads `cls` from a YAML file (optional) plus `key=value` overrides; strict about keys and types."""
    data: dict[str, Any] = {}
    if path is not None:
        path = paths.normal(path)
        if not paths.isfile(path):
            raise ConfigError(f"config file {str(path)!r} does not exist")
        with paths.open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {str(path)!r} is over {MAX_CONFIG_BYTES} bytes: not a config")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {e.start})") from None
        data = parse_yaml(text, f"config file {str(path)!r}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at top level")
    overrides = list(overrides or [])
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as e:
        raise ConfigError(f"{e}{_source(cls, data, path, overrides, str(e))}") from None


def _source(cls: type, data: dict[str, Any], path: str | None, overrides: list[str], message: str) -> str:
    """Where the error `message` of loading `cls` from file `path` (its mapping `data`) plus `overrides`
    comes from, as a suffix: the file when it alone fails so, the command line when the file alone loads,
    else both (a key the file lacks that an override gives)."""
    if path is None:
        none = not overrides or "the required key" in message
        return " (no config file: --config X.yaml)" if none else " (in the key=value overrides)"
    if not overrides:
        return f" (in {path})"
    try:
        from_dict(cls, data)
    except ConfigError as e:
        return f" (in {path})" if str(e) == message else f" (in {path} or the key=value overrides)"
    return " (in the key=value overrides)"
