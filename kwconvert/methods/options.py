"""What every method's options share: checked values and glob lists, and (for the per-layer
methods) construction from keyword arguments and their JSON form in the plan."""
from __future__ import annotations

import dataclasses
from typing import Any


def choice(name: str, value: Any, choices: tuple) -> None:
    """Refuse an option whose value is not one of ``choices``, listing them."""
    if value not in choices:
        raise ValueError(f"option {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_globs(name: str, value) -> tuple[str, ...]:
    """An include / exclude option as a tuple of glob strings."""
    patterns = (value,) if isinstance(value, str) else tuple(value or ())
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"option {name} must be glob patterns (strings), got {value!r}")
    return patterns


class MethodOptions:
    """What a per-layer method's options dataclass shares: built from keyword arguments (an
    unknown name is refused, listing the known ones) and written to the plan's JSON."""

    #: The method's key (``"odconv"``) and its name in messages (``"ODConv"``).
    method: str
    label: str

    @classmethod
    def from_kwargs(cls, **options: Any):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown {cls.label} option {unknown[0]!r}; {cls.label} takes {', '.join(sorted(known))}")
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(include=list(self.include), exclude=list(self.exclude), method=self.method)
        return data


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
