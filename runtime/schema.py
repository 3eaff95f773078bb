"""The manifest's parser: JSON in, frozen dataclasses out, every field checked against its annotation.

    class LlmInfo(Section):
        head_dim: Annotated[int, Range(1, 4096)]   # LlmInfo.from_dict({...}) checks it, naming the field

A field's type and its constraints (`Range`, `OneOf`, `Matches`) are read from
the dataclass annotations; `Section.from_dict` parses a JSON value into the
section, recursing through nested sections, tuples, mappings and unions, and
every problem is one EngineError whose message starts with the field's path
(`llm.head_dim: 0 is below the minimum 1`). Values echoed in messages are
bounded (`brief`), however long or nested the value.
"""
from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any

from .errors import EngineError

# -- field constraints, read from the annotations by the parser

@dataclass(frozen=True)
class Range:
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded

    def check(self, value) -> str | None:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return f"{brief(value)} is {'not above' if self.lo_open else 'below'} the minimum {self.lo:g}"
        if self.hi is not None and value > self.hi:
            return f"{brief(value)} is above the maximum {self.hi:g}"
        return None


@dataclass(frozen=True)
class OneOf:
    values: tuple

    def check(self, value) -> str | None:
        return None if value in self.values else f"{brief(value)} is not one of {', '.join(map(str, self.values))}"


@dataclass(frozen=True)
class Matches:
    pattern: str
    what: str

    def check(self, value) -> str | None:
        return None if re.fullmatch(self.pattern, value) else f"{brief(value)} is not {self.what}"


class Section:
    """JSON in and out for every section: `from_dict` checks what `to_dict` writes."""

    @classmethod
    def from_dict(cls, data: Any):
        """Type-, range- and consistency-checked; an error names the field (`llm.head_dim: ...`)."""
        return _parse(cls, data, "")

    def to_dict(self) -> dict[str, Any]:
        return _to_json(self)



# -- the parser: JSON -> frozen dataclasses, checked against the annotations

def _parse(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _parse(args[0], value, where)
        for mark in args[1:]:
            if (problem := mark.check(value)) is not None:
                raise _error(where, problem)
        return value
    if dataclasses.is_dataclass(hint):
        return _parse_dataclass(hint, value, where)
    if hint is type(None):
        if value is not None:
            raise _error(where, f"expected null, got {_kind(value)}")
        return None
    if hint is Any:
        return value
    if hint in (bool, int, float, str):
        return _parse_scalar(hint, value, where)
    if origin in (types.UnionType, typing.Union):
        problems = []
        for option in args:
            try:
                return _parse(option, value, where)
            except EngineError as e:
                problems.append(str(e).removeprefix(f"{where}: "))
        raise _error(where, " or ".join(problems))
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _error(where, f"expected a list, got {_kind(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        elif len(value) != len(args):
            raise _error(where, f"expected {len(args)} values, got {len(value)}")
        return tuple(_parse(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is Mapping:
        if not isinstance(value, dict):
            raise _error(where, f"expected an object, got {_kind(value)}")
        for k in value:
            if _bad_text(k):
                raise _error(where, f"key {brief(k)} is not valid Unicode text (a lone surrogate)")
        return MappingProxyType({k: _parse(args[1], v, f"{where}.{k}" if where else k) for k, v in value.items()})
    raise TypeError(f"the manifest schema has an unsupported annotation {hint!r}")


def _parse_scalar(hint: type, value, where: str):
    ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            value, ok = float(value), True
        except OverflowError:
            raise _error(where, f"expected a finite number, got {brief(value)}") from None
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[hint]
        raise _error(where, f"expected {want}, got {_kind(value)}")
    if hint is float and not math.isfinite(value):
        raise _error(where, f"expected a finite number, got {value}")
    if hint is str and _bad_text(value):
        raise _error(where, f"{brief(value)} is not valid Unicode text (a lone surrogate)")
    return value


def _bad_text(text: str) -> bool:
    # JSON's \ud800 escapes decode to lone surrogates, which no file name, tokenizer or
    # graph tensor name can take: they would fail far from here, not as a manifest error.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_dataclass(cls, value, where: str):
    if not isinstance(value, dict):
        raise _error(where, f"expected an object, got {_kind(value)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = dataclasses.fields(cls)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    if missing := [n for n in required if n not in value]:
        raise _error(where, f"lacks {', '.join(missing)}")
    # Unknown keys are ignored: additions within a format version.
    parsed = {f.name: _parse(hints[f.name], value[f.name], f"{where}.{f.name}" if where else f.name)
              for f in fields if f.name in value}
    try:
        return cls(**parsed)
    except ValueError as e:
        raise _error(where, str(e)) from None


def _error(where: str, problem: str) -> EngineError:
    return EngineError(f"{where}: {problem}" if where else problem)


def invalid(hint, value) -> bool:
    """Whether `value` fails `hint`'s checks."""
    try:
        _parse(hint, value, "")
    except EngineError:
        return True
    return False


def _kind(value) -> str:
    return f"{type(value).__name__} {brief(value)}"


# repr of a manifest value for a message: bounded in length and depth, however long or nested the value.
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlist = _REPR.maxdict = 6
_REPR.maxlevel = 3


def brief(value) -> str:
    """repr of `value`, bounded in length and depth."""
    return _REPR.repr(value)


def clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _to_json(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    return value
