"""Typed, validated hyperparameter fields for estimators and tasks.

A component is a dataclass whose fields are declared with :func:`hyper`; validation runs in
``__post_init__`` and raises :class:`~estbench.errors.EstbenchError` with a message that names the
component, the field, the constraint and the bad value.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

from estbench.errors import EstbenchError, did_you_mean

__all__ = ["hyper", "HyperParams"]


def hyper(
    default: Any,
    *,
    doc: str = "",
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """Declare a hyperparameter field with a default, a docstring and constraints."""
    meta = {"doc": doc, "gt": gt, "ge": ge, "le": le, "choices": choices}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple for a sequence-valued hyperparameter default")
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


class HyperParams:
    """Mixin for dataclasses whose fields are hyperparameters declared with :func:`hyper`."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = self._check_field(field, hints.get(field.name, Any), value)
            object.__setattr__(self, field.name, checked)

    @classmethod
    def hyperparameters(cls) -> list[dataclasses.Field]:
        """The declared hyperparameter fields, in order."""
        return list(dataclasses.fields(cls))

    @classmethod
    def sequence_fields(cls) -> set[str]:
        """Names of fields whose value is itself a sequence (a list in a spec is one value)."""
        hints = typing.get_type_hints(cls)
        return {
            f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is tuple
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]):
        """Build from a mapping, rejecting unknown keys with the known ones listed."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in params:
            if key not in known:
                listing = ", ".join(known) if known else "(none)"
                raise EstbenchError(
                    f"unknown parameter '{key}' for {cls.kind} '{cls.name}'."
                    f"{did_you_mean(key, known)} Known parameters: {listing}"
                )
        return cls(**params)

    def params(self) -> dict[str, Any]:
        """Hyperparameters as a JSON-ready dict (tuples become lists)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def _fail(self, field: str, requirement: str, value: Any, fix: str = "") -> typing.NoReturn:
        msg = f"{self.kind} '{self.name}': {field} must be {requirement}, got {value!r}"
        raise EstbenchError(msg + (f"; {fix}" if fix else ""))

    def _check_field(self, field: dataclasses.Field, tp: Any, value: Any) -> Any:
        name, meta = field.name, field.metadata
        origin = typing.get_origin(tp)
        if origin is tuple:
            if not isinstance(value, (list, tuple)):
                self._fail(name, "a list", value)
            (inner, *_rest) = typing.get_args(tp) or (Any,)
            return tuple(self._coerce(name, inner, v) for v in value)
        if origin is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None:
                return None
            tp = args[0]
        value = self._coerce(name, tp, value)
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            options = ", ".join(repr(c) for c in choices)
            self._fail(name, f"one of {options}", value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                self._fail(name, "a finite number", value)
            if meta.get("gt") is not None and not value > meta["gt"]:
                self._fail(name, f"> {meta['gt']}", value, f"set {name} above {meta['gt']}")
            if meta.get("ge") is not None and not value >= meta["ge"]:
                self._fail(name, f">= {meta['ge']}", value, f"set {name} to at least {meta['ge']}")
            if meta.get("le") is not None and not value <= meta["le"]:
                self._fail(name, f"<= {meta['le']}", value, f"set {name} to at most {meta['le']}")
        return value

    def _coerce(self, name: str, tp: Any, value: Any) -> Any:
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                self._fail(name, "true or false", value)
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(name, "an integer", value)
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self._fail(name, "a number", value)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                self._fail(name, "a string", value)
            return value
        if not isinstance(value, tp):
            self._fail(name, f"of type {_type_name(tp)}", value)
        return value
