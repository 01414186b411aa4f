"""Option and argument values without pydantic, where nothing needs it.

Typer 0.29 turns every value through a pydantic TypeAdapter, which it builds the first time a parameter is
processed, even when the value is None (an option not given): `cm group --help` imported pydantic for `--config`
alone, and every database command built an adapter per option. Most of cm's parameters are text, whole numbers,
lists of text and flags, whose values arrive as the command line gives them: `plain` hands those over as Typer's
adapter would, and anything else (a malformed number, one out of its bounds, a path, a choice) to Typer's own
coercion, so its messages and checks stay exactly Typer's. tests/test_startup.py fails if pydantic comes back
into a command that does not need it.
"""

from __future__ import annotations

import re
from typing import Any

from typer._click import Context  # Typer 0.29 ships its own Click
from typer._coercion import RuntimeParam, build_runtime_param
from typer.core import TyperArgument, TyperOption

# What Typer's adapter reads as the same whole number (it takes more: " 12", "1_000", "+3", "12.0", which go to
# it). 18 digits stay far inside int()'s own limit.
_WHOLE = re.compile(r"-?[0-9]{1,18}")
_PLAIN_TYPES: tuple[Any, ...] = (str, int, bool, list[str])


class _Plain(RuntimeParam):  # a dataclass already (its fields, its __init__): no decorator to run again
    def _coerce_value(self, value: Any, param: Any, ctx: Context) -> Any:
        kind = self.annotation
        if kind is str and isinstance(value, str):
            return value
        if kind is int and isinstance(value, str) and _WHOLE.fullmatch(value):
            value = int(value)
        if kind is int and type(value) is int and self._within(value):
            return value
        if kind is bool and type(value) is bool:
            return value
        if kind == list[str] and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)

    def _within(self, number: int) -> bool:
        low, high = self.parameter_info.min, self.parameter_info.max
        return (low is None or number >= low) and (high is None or number <= high)


def plain(param: TyperArgument | TyperOption) -> None:
    """Give `param` the pydantic-free coercion when its type allows (and Typer still works this way)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(param, "_runtime_param", False) is not None:
        return  # not Typer 0.29's kind of parameter, or its coercion is already made
    info = descriptor.parameter_info
    if descriptor.file_annotation is not None or info.parser is not None or descriptor.is_choice:
        return
    bounded = info.min is not None or info.max is not None
    if info.clamp or (bounded and descriptor.annotation is not int):  # a whole number's bounds are checked here
        return
    if any(descriptor.annotation == kind for kind in _PLAIN_TYPES):
        param._runtime_param = _Plain(parameter_info=info, annotation=descriptor.annotation)
