"""The machinery behind :mod:`balpoe.recipe`: recipe text -> plain data -> typed, validated dataclasses.

The schema (the dataclasses, their defaults and bounds) and the checks between keys live in
:mod:`balpoe.recipe`; this module reads any such dataclass generically: every field's type from its
annotation and its bounds from its metadata (``choices``, ``min``, ``max``, ``gt``, ``max_len``,
``doc``), so a key added to the schema is parsed, bounded and documented with no change here.

* :func:`build_section`: a mapping -> one dataclass, key by key (unknown keys, wrong types,
  non-finite numbers and out-of-range values are one-line :class:`~balpoe.errors.BalpoeError` errors
  naming the key; values in messages are bounded, :func:`~balpoe.errors.shown`).  Numbers may be
  written as Python writes them (``1e-3``, ``.5``, ``1_000``; YAML 1.1 alone reads ``1e-3`` as a
  string); integer keys also take integral values with an exponent (``1e6``).
* :func:`read_mapping`: a recipe file -> its mapping of sections (bounded, UTF-8, duplicate-free YAML).
* :func:`parse_override`, :func:`apply_overrides`: ``--set key=value`` (dotted keys, YAML values).
* :func:`markdown_reference`: every key as a Markdown table (``docs/recipe.md``).

Nothing here imports :mod:`balpoe.recipe`: the import runs one way.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from balpoe.errors import BalpoeError, quoted, shown
from balpoe.runtime.files import MAX_RECIPE_BYTES, DuplicateKey, check_size, parse_yaml, read_text, yaml_problem


#: Longest string a recipe key takes: names (datasets, backbones, ...) and paths (PATH_MAX).
NAME_CHARS, PATH_CHARS = 200, 4096
#: Bounds of the integer keys that count things (epochs, images, workers, ...).
MAX_EPOCHS, MAX_BATCH = 100_000, 2 ** 20
#: ``model.kwargs`` may hold at most this many values (each use of a YAML alias counts) ...
MAX_KWARGS_VALUES = 10_000
#: ... nested at most this deep.
MAX_KWARGS_DEPTH = 32


# ---------------------------------------------------------------------------------------------
# Values: one key at a time

def _type_name(tp: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


_DIGITS = r"\d+(?:_\d+)*"
#: A number as Python writes it (``1e-3``, ``.5``, ``+2``, ``1_000``); YAML 1.1 reads some as strings.
_NUMBER = re.compile(rf"[+-]?(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][+-]?{_DIGITS})?")
_INTEGER = re.compile(rf"[+-]?{_DIGITS}")
#: Integers written with an exponent (``1e6``) may have at most this many digits.
_MAX_INT_DIGITS = 30


def _wrong_type(key: str, tp: Any, value: Any) -> BalpoeError:
    return BalpoeError(f"recipe key '{key}' must be {_type_name(tp)}, got {shown(value)}")


def _number_text(value: Any) -> str | None:
    """``value`` stripped when it is a string written as a Python number, else None."""
    if isinstance(value, str) and len(value) <= 100 and _NUMBER.fullmatch(value.strip()):
        return value.strip()
    return None


def _to_float(value: Any, key: str) -> float:
    text = _number_text(value)
    if text is not None:
        number = float(text)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            raise BalpoeError(f"recipe key '{key}' must be a finite number, got {shown(value)}") from None
    else:
        raise _wrong_type(key, float, value)
    if not math.isfinite(number):
        raise BalpoeError(f"recipe key '{key}' must be a finite number, got {shown(value)}")
    return number


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = _number_text(value)
    if text is None:
        raise _wrong_type(key, int, value)
    if _INTEGER.fullmatch(text):
        return int(text)
    if "e" not in text.lower():  # 2.0 is a float; 1e6 is how Python users write a million
        raise _wrong_type(key, int, value)
    number = decimal.Decimal(text.replace("_", ""))
    if number != number.to_integral_value():
        raise _wrong_type(key, int, value)
    if number.adjusted() >= _MAX_INT_DIGITS:  # clamped: every integer key has a far smaller bound
        return 10 ** _MAX_INT_DIGITS if number > 0 else -(10 ** _MAX_INT_DIGITS)
    return int(number)


#: Control characters and line breaks (C0, DEL, C1, U+2028/9): refused in strings, which end up in messages.
_CONTROL = frozenset(map(chr, [*range(32), *range(127, 160), 0x2028, 0x2029]))


def _to_str(value: Any, key: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise _wrong_type(key, str, value)
    if len(value) > max_len:
        raise BalpoeError(f"recipe key '{key}' must be at most {max_len} characters long, got {len(value)}: "
                          f"{shown(value, 80)}")
    bad = next((c for c in value if c in _CONTROL), None)
    if bad is not None:
        raise BalpoeError(f"recipe key '{key}' must not contain control characters ({bad!r}), got {shown(value)}")
    return value


def check_kwargs(value: Any, key: str = "model.kwargs") -> dict:
    """``value`` is a mapping of keyword names to plain YAML values of bounded size: at most
    :data:`MAX_KWARGS_VALUES` values (a value reached twice through a YAML alias counts twice, so an
    alias chain is refused before anything copies or prints it) nested at most
    :data:`MAX_KWARGS_DEPTH` deep."""
    if not isinstance(value, dict):
        raise _wrong_type(key, dict, value)
    for name in value:
        if not isinstance(name, str) or not name.isidentifier():
            raise BalpoeError(f"recipe key '{key}' must map keyword-argument names to values, got the key "
                              f"{shown(name, 80)}")
    check_size(value, f"recipe key '{key}'", max_values=MAX_KWARGS_VALUES, max_depth=MAX_KWARGS_DEPTH)
    return value


def _coerce(value: Any, tp: Any, key: str, max_len: int = NAME_CHARS) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:  # Optional[X]: X's own (more precise) message
            return _coerce(value, non_null[0], key, max_len)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, max_len)
            except BalpoeError:
                pass
        raise _wrong_type(key, tp, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]", max_len) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        return _to_int(value, key)
    elif tp is float:
        return _to_float(value, key)
    elif tp is str:
        return _to_str(value, key, max_len)
    elif tp is dict:
        return dict(check_kwargs(value, key))
    raise _wrong_type(key, tp, value)


def _yaml_text(choice: Any) -> str:
    """A choice as a recipe writes it (``true``, ``null``), for messages."""
    if choice is True or choice is False or choice is None:
        return {True: "true", False: "false", None: "null"}[choice]
    return str(choice)


def _check_range(value: Any, meta: dict, key: str, written: Any = None) -> None:
    """``value`` is among ``meta``'s choices and within its bounds (each item of a list); messages
    show ``written`` (what the recipe says, e.g. ``'1e6'``) where it is a string."""
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise BalpoeError(f"recipe key '{key}' must be one of {', '.join(map(_yaml_text, meta['choices']))}; "
                          f"got {shown(value)}")
    vals = value if isinstance(value, list) else [value]
    for i, v in enumerate(vals):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        where, raw = (f"{key}[{i}]", written[i] if isinstance(written, (list, tuple)) else None) \
            if isinstance(value, list) else (key, written)
        got = shown(raw if isinstance(raw, str) else v)
        if meta.get("min") is not None and v < meta["min"]:
            raise BalpoeError(f"recipe key '{where}' must be >= {meta['min']}, got {got}")
        if meta.get("max") is not None and v > meta["max"]:
            raise BalpoeError(f"recipe key '{where}' must be <= {meta['max']}, got {got}")
        if meta.get("gt") is not None and v <= meta["gt"]:
            raise BalpoeError(f"recipe key '{where}' must be > {meta['gt']}, got {got}")


def build_section(cls: type, raw: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` from the mapping ``raw`` (None: every default), nested dataclasses
    built from their sub-mappings; ``prefix`` (``"data."``) names the keys in messages."""
    where = prefix.rstrip(".") or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BalpoeError(f"recipe section '{where}' must be a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in fields:
            name = prefix + (k if isinstance(k, str) else shown(k, 80))
            known = ", ".join(fields)
            if len(known) > 200:  # a long section: the closest names, the rest in the reference
                close = difflib.get_close_matches(str(k), list(fields), n=4, cutoff=0.5)
                known = (", ".join(close) + ", ..." if close else f"{', '.join(list(fields)[:8])}, ...") + \
                    f" ({len(fields)} keys, listed in docs/recipe.md)"
            raise BalpoeError(f"unknown recipe key {quoted(name, 120)} (known in '{where}': {known})")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        key, tp = f"{prefix}{name}", hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, raw[name], key + ".")
        else:
            value = _coerce(raw[name], tp, key, f.metadata.get("max_len", NAME_CHARS))
            _check_range(value, dict(f.metadata), key, raw[name])
            kwargs[name] = value
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Files and overrides

def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=0.05'`` -> (['optim', 'lr'], 0.05); the value is parsed as YAML."""
    if "=" not in text:
        raise BalpoeError(f"override expects key=value, got {shown(text)}")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise BalpoeError(f"override expects key=value, got {shown(text)}")
    path = key.split(".")
    if not all(path):
        raise BalpoeError(f"override {shown(text)}: the key must be dotted names such as optim.lr")
    try:
        parsed = parse_yaml(value) if value.strip() else None
    except DuplicateKey as e:
        raise BalpoeError(f"override {shown(text)}: {yaml_problem(e).split(': ', 1)[-1]}") from None
    except yaml.YAMLError:
        parsed = value
    return path, parsed


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``raw`` (a recipe's plain data, changed in place and returned) with each ``key=value`` of
    ``overrides`` (:func:`parse_override`) set, sections created where missing."""
    for text in overrides or []:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise BalpoeError(f"override {shown(text)}: {quoted(part, 80)} is not a section")
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return raw




def read_mapping(path: str | Path) -> dict:
    """The mapping of sections in the recipe file ``path``: UTF-8 text of at most
    :data:`~balpoe.runtime.files.MAX_RECIPE_BYTES` (:func:`~balpoe.runtime.files.read_text`), YAML
    without a key twice in one mapping (:func:`~balpoe.runtime.files.parse_yaml`; nesting too deep
    for the parser is a YAML error too); one-line errors naming the file and the problem."""
    path = Path(path)
    text = read_text(path, "recipe file", max_bytes=MAX_RECIPE_BYTES, kind="a YAML file",
                     limit=f"a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        raw = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        problem = yaml_problem(e)
        detail = f" ({problem})" if problem else ""
        raise BalpoeError(f"recipe file {quoted(path)} is not valid YAML{detail}") from None
    if not isinstance(raw, dict):
        raise BalpoeError(f"recipe file {quoted(path)} must hold a mapping of sections")
    return raw


# ---------------------------------------------------------------------------------------------
# Reference of every key (docs/recipe.md)

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _allowed(meta: dict) -> str:
    if meta.get("choices") is not None:
        return ", ".join(f"`{_yaml_text(c)}`" for c in meta["choices"])
    def num(v) -> str:
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"
    parts = [f"≥ {num(meta['min'])}" if meta.get("min") is not None else "",
             f"> {num(meta['gt'])}" if meta.get("gt") is not None else "",
             f"≤ {num(meta['max'])}" if meta.get("max") is not None else ""]
    return ", ".join(p for p in parts if p)


def _default(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"



def markdown_reference(root: type, intro: str) -> str:
    """Every key of the dataclass ``root`` and of its nested sections with its type, default,
    allowed values and description, as Markdown: ``intro``, then one table per section (a
    section's docstring, when it has one, above its table)."""
    lines = ["# Recipe keys", "", intro, ""]

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                subs.append((hints[f.name], f"{prefix}{f.name}."))
                continue
            meta = dict(f.metadata)
            rows.append(f"| `{prefix}{f.name}` | {_cell(_type_name(hints[f.name]))} | {_cell(_default(f))} | "
                        f"{_cell(_allowed(meta))} | {_cell(meta.get('doc', ''))} |")
        title = prefix.rstrip(".") or "top level"
        doc = (cls.__doc__ or "").strip() if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(") else ""
        lines.extend([f"## {title}", ""] + ([" ".join(doc.split()), ""] if doc else []) +
                     ["| key | type | default | allowed | description |", "|---|---|---|---|---|", *rows, ""])
        for sub_cls, sub_prefix in subs:
            section(sub_cls, sub_prefix)

    section(root, "")
    return "\n".join(lines)
