"""Typed dataclass schemas from plain dicts (YAML, ``key=value`` overrides), with errors that
name the dotted key. Shared by the run config and the reward options of ``apex score/serve``."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Union

import yaml

from apexcli.errors import ApexError


def _is_optional(tp) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _coerce(value: Any, tp: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ApexError(f"config key '{key}' may not be null")
    tp = inner
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ApexError(f"config key '{key}' must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is dict:  # a mapping whose keys the schema does not know (rewards.extra.<name>)
        if not isinstance(value, dict):
            raise ApexError(f"config key '{key}' must be a mapping, got {value!r}")
        value_tp = typing.get_args(tp)[1]
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]  # "a,b" / "1,2" shorthand
        if not isinstance(value, (list, tuple)):
            raise ApexError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ApexError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str) and re.fullmatch(
            r"[+-]?[0-9]+", value.strip()
        ):  # ASCII digits only: not "²", not "--5"
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ApexError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        # NaN passes every range check (all comparisons are false) and poisons training silently
        if number is None or math.isnan(number):
            raise ApexError(f"config key '{key}' must be a number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ApexError(f"config key '{key}' must be a string, got {value!r}")
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
        raise ApexError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``train.lr=1e-4`` -> {"train": {"lr": 1e-4}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ApexError(f"override '{text}' must look like key=value (e.g. train.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ApexError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


# ---------------------------------------------------------------------------------------------
# per-field constraints, declared beside each field:  lr: float = setting(3e-4, gt=0)
# ---------------------------------------------------------------------------------------------

RESUME_POLICIES = ("apply", "refuse")


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field accepts, checked at config time by ``check_fields`` (errors name the dotted key).

    Numbers (and each number of a list) must be finite unless ``finite=False``; the bounds apply to
    them. ``choices`` limits a string; ``nonempty`` refuses an empty string or list. ``resume``
    says what a resumed run does when the value differs from the checkpoint's: ``apply`` it (the
    trainer reads it afresh) or ``refuse`` (the checkpoint only makes sense with its own value:
    model identity, LoRA shape, seeds)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    nonempty: bool = False
    finite: bool = True
    resume: str = "apply"
    resume_key: typing.Callable[[Any], Any] | None = None

    def problem(self, value: Any) -> str | None:
        """Why ``value`` breaks the rule (``must be ..., got ...``), or None when it is fine."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if self.nonempty and not value:
                return "must not be empty"
            for item in value:
                why = self.problem(item)
                if why is not None:
                    return f"{why} (in {list(value)!r})"
            return None
        if isinstance(value, str):
            if self.nonempty and not value.strip():
                return "must not be empty"
            if self.choices is not None and value not in self.choices:
                return f"must be one of {', '.join(self.choices)}, got '{value}'"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if self.finite and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        ok = (
            (self.gt is None or value > self.gt)
            and (self.ge is None or value >= self.ge)
            and (self.lt is None or value < self.lt)
            and (self.le is None or value <= self.le)
        )
        return None if ok else f"must be {self._range()}, got {value}"

    def _range(self) -> str:
        def num(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"

        low = (
            (f"({num(self.gt)}", f"> {num(self.gt)}")
            if self.gt is not None
            else (f"[{num(self.ge)}", f">= {num(self.ge)}")
            if self.ge is not None
            else None
        )
        high = (
            (f"{num(self.lt)})", f"< {num(self.lt)}")
            if self.lt is not None
            else (f"{num(self.le)}]", f"<= {num(self.le)}")
            if self.le is not None
            else None
        )
        if low and high:
            return f"in {low[0]}, {high[0]}"
        return (low or high)[1]


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field with a ``Rule`` (see there): ``rank: int = setting(32, ge=1, resume="refuse")``."""
    if "choices" in rule:
        rule["choices"] = tuple(rule["choices"])
    checked = Rule(**rule)
    if checked.resume not in RESUME_POLICIES:
        raise ValueError(f"resume policy must be one of {RESUME_POLICIES}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": checked})


def field_rule(f: dataclasses.Field) -> Rule:
    """The field's declared rule; an undeclared field still has to be finite if it is a number."""
    return f.metadata.get("rule", Rule())


def iter_fields(obj: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any, Rule]]:
    """``(dotted key, value, rule)`` of every leaf field of a dataclass tree; the entries of a
    mapping field are leaves under its key (``rewards.extra.redness.margin``), with its rule."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from iter_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, dict):
            yield from ((key, leaf, field_rule(f)) for key, leaf in _leaves(value, f"{prefix}{f.name}."))
        else:
            yield f"{prefix}{f.name}", value, field_rule(f)


def _leaves(data: dict, prefix: str) -> typing.Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def check_fields(obj: Any, prefix: str = "") -> None:
    """Raise ApexError naming the dotted key of the first field that breaks its rule."""
    for key, value, rule in iter_fields(obj, prefix):
        why = rule.problem(value)
        if why is not None:
            raise ApexError(f"config key '{key}' {why}")


def flatten_dict(data: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: a nested config as dotted keys (mappings recursed, other values kept)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
