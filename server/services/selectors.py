"""Device selectors: `runtime == onnxruntime and threads == 1`.

A selector is clauses joined by `and`; a clause is `attribute OP value` with OP one of
`== != < <= > >=`. Attributes are a device's columns (name, hardware, category, runtime, threads,
batch_size, precision) or keys of its free-form `attributes`. Values compare as numbers when both
sides are numbers, else as strings; a device without the attribute never matches.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from server.models import Device

COLUMNS = ("name", "hardware", "category", "runtime", "threads", "batch_size", "precision")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
}
_CLAUSE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*(==|!=|<=|>=|<|>)\s*(?:\"([^\"]*)\"|'([^']*)'|(\S+))\s*$")
_AND = re.compile(r"\s+and\s+", re.IGNORECASE)


class SelectorError(ValueError):
    """The selector does not parse."""


@dataclass(frozen=True)
class Clause:
    attribute: str
    op: str
    value: str

    def matches(self, attributes: dict[str, Any]) -> bool:
        actual = attributes.get(self.attribute)
        if actual is None:
            return False
        left, right = _coerce(actual), _coerce(self.value)
        if isinstance(left, float) != isinstance(right, float):
            left, right = str(actual).lower(), self.value.lower()
        try:
            return _OPS[self.op](left, right)
        except TypeError:
            return False


def _coerce(value: Any) -> Any:
    if isinstance(value, bool):
        return str(value).lower()
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value).lower()


@lru_cache(maxsize=1024)
def parse(selector: str) -> tuple[Clause, ...]:
    if not selector.strip():
        raise SelectorError("empty selector")
    clauses = []
    for part in _AND.split(selector.strip()):
        match = _CLAUSE.match(part)
        if match is None:
            raise SelectorError(f"cannot read {part.strip()!r}: expected `attribute OP value` with OP one of "
                                + " ".join(_OPS))
        name, op, *quoted = match.groups()
        clauses.append(Clause(name, op, next(v for v in quoted if v is not None)))
    return tuple(clauses)


def device_attributes(device: Device) -> dict[str, Any]:
    return {**device.attributes, **{column: getattr(device, column) for column in COLUMNS}}


def matches(selector: str, device: Device) -> bool:
    attributes = device_attributes(device)
    return all(clause.matches(attributes) for clause in parse(selector))
