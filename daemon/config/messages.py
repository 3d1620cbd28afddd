"""Pydantic's validation errors as short messages a person can act on (with did-you-mean)."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import (
    BaseModel,
)
from pydantic_core import ErrorDetails

from daemon.config.models import Config
from daemon.config.yaml_lines import Path

# --- pydantic errors as short human messages ---------------------------------------------------


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """Given a field's annotation, return the model inside it (through Optional, list, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        found = _inner_model(argument)
        if found is not None:
            return found
    return None


def _model_at(path: Path) -> type[BaseModel] | None:
    """Given a location in the config, return the model that validates the mapping there."""
    model: type[BaseModel] | None = Config
    for part in path:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _inner_model(model.model_fields[part].annotation)
    return model


def _unknown_key_message(path: Path) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1])
    if model is None:
        return "unknown key"
    names = list(model.model_fields)
    for name in names:
        nested = _inner_model(model.model_fields[name].annotation)
        if nested is not None and key in nested.model_fields:
            return f"unknown key here ({key} belongs under '{name}:')"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key (did you mean '{close[0]}'?)"
    return "unknown key (expected one of: " + ", ".join(names) + ")"


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, float):
        return f"{value:g}"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MESSAGES: Mapping[str, str] = {
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected text",
    "model_type": "expected a mapping of keys",
    "model_attributes_type": "expected a mapping of keys",
    "dict_type": "expected a mapping of keys",
    "list_type": "expected a list",
}


def _message_for(error: ErrorDetails) -> str:
    kind = error["type"]
    path: Path = tuple(error["loc"])
    context = error.get("ctx") or {}
    got = error.get("input")
    if "storage_options" in path:
        got = "(not shown: storage_options may hold secrets)"
    if kind == "extra_forbidden":
        return _unknown_key_message(path)
    if kind == "missing":
        return "required, but missing"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        operator = {"greater_than_equal": ">=", "greater_than": ">"}.get(kind)
        operator = operator or {"less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(context.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        return f"must be {operator} {bound} (got {_shown(got)})"
    if kind == "literal_error":
        expected = str(context.get("expected", "")).replace("'", "")
        return f"must be one of {expected} (got {_shown(got)})"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    if kind in _MESSAGES:
        message = _MESSAGES[kind]
        if kind.startswith("bool") and isinstance(got, str):
            message += f" (got {got!r}: yes/no/on/off are text in ckptd's YAML)"
        elif kind.startswith("string") and isinstance(got, int | float | bool):
            message += f" (got {_shown(got)}: put quotes around it)"
        else:
            message += f" (got {_shown(got)})"
        return message
    return str(error["msg"])
