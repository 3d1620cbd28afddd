"""config.example.yaml validates and mentions every key of the models, so it cannot drift."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from daemon.config import Config, StrictYamlLoader, load_config_with_warnings, policy_for
from policies.model import PolicySpec

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"


def models_inside(annotation: Any) -> list[type[BaseModel]]:
    """Given a field annotation, return the models in it (through Optional, list, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in models_inside(argument)]


def every_model(model: type[BaseModel], found: set[type[BaseModel]]) -> set[type[BaseModel]]:
    if model not in found:
        found.add(model)
        for field in model.model_fields.values():
            for inner in models_inside(field.annotation):
                every_model(inner, found)
    return found


def keys_written(model: type[BaseModel], data: Any, seen: dict[type[BaseModel], set[str]]) -> None:
    """Given a model and the example's data at its place, record which of its keys are there."""
    if not isinstance(data, dict):
        return
    seen.setdefault(model, set()).update(data)
    for key, value in data.items():
        for inner in models_inside(model.model_fields[key].annotation):
            for item in value if isinstance(value, list) else [value]:
                keys_written(inner, item, seen)


def test_the_example_validates_without_warnings() -> None:
    config, warnings = load_config_with_warnings(EXAMPLE)
    assert warnings == []
    assert [root.path for root in config.roots] == [
        "/data/training/current_model",
        "/data/training/resnet50",
        "/data/training/jax_sweep",
    ]
    assert config.snapshots.at == "03:00"
    assert config.disk.min_free == 50 * 1000**3


def test_the_example_has_the_two_series_of_the_design() -> None:
    config = load_config_with_warnings(EXAMPLE)[0]
    root = config.roots[1]
    assert [series.pattern for series in root.series] == [
        "mid_epoch_{epoch}_{step}.pt",
        "checkpoint_epoch_{epoch}.pt",
    ]
    assert policy_for(config, root, root.series[0]) == PolicySpec(5, 0, None)
    assert policy_for(config, root, root.series[1]) == PolicySpec(20, 20, 1000)
    assert root.protect == ["best.pt", "last.pt"]


def test_every_key_of_every_model_appears_in_the_example() -> None:
    data = yaml.load(EXAMPLE.read_text(), Loader=StrictYamlLoader)
    seen: dict[type[BaseModel], set[str]] = {}
    keys_written(Config, data, seen)
    missing = {
        model.__name__: sorted(set(model.model_fields) - seen.get(model, set()))
        for model in every_model(Config, set())
    }
    assert {name: keys for name, keys in missing.items() if keys} == {}


def test_every_key_is_explained_by_a_comment_where_it_first_appears() -> None:
    lines = EXAMPLE.read_text().splitlines()
    names = {name for model in every_model(Config, set()) for name in model.model_fields}
    unexplained = []
    for name in sorted(names):
        key = re.compile(rf"^\s*(?:- )?{name}:")
        first = next(number for number, line in enumerate(lines) if key.match(line))
        if "#" not in lines[first] and not lines[first - 1].strip().startswith("#"):
            unexplained.append(f"line {first + 1}: {lines[first].strip()}")
    assert unexplained == []
