"""Small argument checks shared by every public constructor; each raises LightningInterpError naming the argument."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning_interp.errors import LightningInterpError


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LightningInterpError(f"Expected argument `{name}` to be an int >= {minimum}, but got {value!r}.")
    return value


def check_optional_positive_int(name: str, value: Any, minimum: int = 1) -> int | None:
    return None if value is None else check_positive_int(name, value, minimum)


def check_positive_float(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise LightningInterpError(f"Expected argument `{name}` to be a number {bound}, but got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise LightningInterpError(
            f"Expected argument `{name}` to be one of {sorted(choices)}, but got {value!r}."
        )
    return value


def check_choices(name: str, values: Any, choices: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = (values,)
    values = tuple(values)
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        raise LightningInterpError(
            f"Expected argument `{name}` to name methods from {sorted(choices)}, but got {list(values)!r}"
            f" (unknown: {unknown})."
        )
    return values


def check_module_types(name: str, values: Any) -> tuple[type, ...]:
    """A sequence of ``nn.Module`` subclasses (the classes themselves, not instances)."""
    from torch import nn

    values = tuple(values)
    for value in values:
        if not (isinstance(value, type) and issubclass(value, nn.Module)):
            raise LightningInterpError(
                f"Expected argument `{name}` to hold nn.Module subclasses, but got {value!r}. "
                f"Pass the classes themselves, e.g. `{name}=[MyNorm]`."
            )
    return values
