"""YAML as the config file needs it: YAML 1.2 scalars, no duplicate keys, a line for every key.

The parsed document keeps, for every key path, the line it stands on, so each problem can be
reported as `file:line field.path: message`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from daemon.errors import ConfigError

# --- YAML: strict scalars, duplicate keys, a line for every key ----------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.1's implicit types that surprise people: `no` is false, `3:00` is 180, `0755` is octal,
# `2024-01-01` is a date. ckptd reads scalars the YAML 1.2 way instead.
_REPLACED_TAGS = {
    _BOOL_TAG,
    _INT_TAG,
    _FLOAT_TAG,
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:value",
}


class StrictYamlLoader(yaml.SafeLoader):
    """A SafeLoader whose plain scalars follow YAML 1.2: only true/false are booleans, numbers
    are decimal (no sexagesimal `3:00`, no octal `0755`), and dates stay text."""


StrictYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictYamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
StrictYamlLoader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789")
)
StrictYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
            |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _construct_decimal_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    return int(text.replace("_", ""), 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = str(loader.construct_scalar(node)).replace("_", "").lower()  # type: ignore[arg-type]
    sign = -1.0 if text.startswith("-") else 1.0
    unsigned = text.lstrip("+-")
    if unsigned == ".inf":
        return sign * float("inf")
    if unsigned == ".nan":
        return float("nan")
    return float(text)


StrictYamlLoader.add_constructor(_INT_TAG, _construct_decimal_int)
StrictYamlLoader.add_constructor(_FLOAT_TAG, _construct_float)

Path = tuple[str | int, ...]


@dataclass(frozen=True, order=True)
class Problem:
    """One finding about the config: a line in the file, the field it concerns, a message."""

    line: int
    path: Path = field(compare=False)
    message: str = field(compare=False)

    def format(self, file: str) -> str:
        """Given the file name to show, return `file:line field.path: message`."""
        return f"{file}:{self.line} {format_path(self.path)}: {self.message}"


def format_path(path: Path) -> str:
    """Given a location such as ("roots", 0, "policy"), return `roots[0].policy`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text or "(top level)"


@dataclass
class _Document:
    """A parsed YAML file: plain Python data, the line of every key and item, and problems."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    # Values that could not be read at all: a second "expected ..." about them would be noise.
    unreadable: set[Path] = field(default_factory=set)

    def line_of(self, path: Path) -> int:
        """Given a location, return the line of it or of its nearest ancestor in the file."""
        for length in range(len(path), 0, -1):
            line = self.lines.get(tuple(path[:length]))
            if line is not None:
                return line
        return 1


_MAX_NODES = 200_000


class _TooLarge(Exception):
    """The document expands to more values than any config has."""


class _DocumentBuilder:
    """Turns composed YAML nodes into Python data, recording lines and duplicate keys."""

    def __init__(self, loader: StrictYamlLoader) -> None:
        self.loader = loader
        self.document = _Document(data=None)
        self._open_nodes: set[int] = set()
        self._budget = _MAX_NODES

    def build(self, node: yaml.Node, path: Path) -> Any:
        self._budget -= 1
        if self._budget < 0:
            # Aliases of aliases grow exponentially ("billion laughs"); no real config is close.
            raise _TooLarge
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except (ValueError, TypeError, OverflowError):
                # An explicit tag that does not fit its text, such as `!!int 0x1F`.
                tag = node.tag.rsplit(":", 1)[-1]
                self.document.problems.append(
                    Problem(node.start_mark.line + 1, path, f"{node.value!r} is not a valid {tag}")
                )
                self.document.unreadable.add(path)
                return None
        if id(node) in self._open_nodes:
            self.document.problems.append(
                Problem(node.start_mark.line + 1, path, "an alias refers to itself")
            )
            return None
        self._open_nodes.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return self._sequence(node, path)
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return None
        finally:
            self._open_nodes.discard(id(node))

    def _sequence(self, node: yaml.SequenceNode, path: Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            self.document.lines[(*path, index)] = item.start_mark.line + 1
            items.append(self.build(item, (*path, index)))
        return items

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        own: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                # `<<: *anchor` (or a list of anchors, earlier ones winning) supplies defaults
                # that keys written here override: that is not a duplicate.
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in reversed(sources):
                    value = self.build(source, path)
                    if isinstance(value, dict):
                        merged.update(value)
                    else:
                        self.document.problems.append(
                            Problem(line, path, "'<<' must merge a mapping (an &anchor of keys)")
                        )
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.document.problems.append(
                    Problem(line, path, "a key must be a plain name, not a list or mapping")
                )
                continue
            # The key's text as written: `yes:` or `3:00:` must not turn into True or 180.
            key = str(key_node.value)
            if key in first_line:
                self.document.problems.append(
                    Problem(line, (*path, key), f"duplicate key (first at line {first_line[key]})")
                )
            else:
                first_line[key] = line
            self.document.lines[(*path, key)] = line
            own[key] = self.build(value_node, (*path, key))
        return {**merged, **own}


def _syntax_problem(file: str, error: yaml.YAMLError, text: str) -> str:
    if isinstance(error, yaml.reader.ReaderError):
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        character = error.character
        code = character if isinstance(character, int) else ord(character)
        return f"{file}:{line}:{column} invalid YAML: character U+{code:04X} is not allowed"
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return f"{file}: invalid YAML: {error}"
    mark = error.problem_mark
    message = error.problem or "invalid YAML"
    if error.context:
        context_line = error.context_mark.line + 1 if error.context_mark is not None else None
        message += f" ({error.context}" + (f" at line {context_line})" if context_line else ")")
    if "'\\t'" in message:
        message += "; YAML indents with spaces, not tabs"
    if "'*'" in message or "alphabetic or numeric character" in message:
        message += '; quote values that start with * or &, e.g. schedule: "0 4 * * sun"'
    return f"{file}:{mark.line + 1}:{mark.column + 1} invalid YAML: {message}"


def _parse_yaml(text: str, file: str) -> _Document:
    try:
        # Constructing the loader already checks characters (a NUL is a ReaderError).
        loader = StrictYamlLoader(text)
    except yaml.YAMLError as error:
        raise ConfigError([_syntax_problem(file, error, text)]) from None
    try:
        builder = _DocumentBuilder(loader)
        node = loader.get_single_node()
        builder.document.data = {} if node is None else builder.build(node, ())
        return builder.document
    except yaml.YAMLError as error:
        raise ConfigError([_syntax_problem(file, error, text)]) from None
    except _TooLarge:
        raise ConfigError([f"{file}: expands to more than {_MAX_NODES} values"]) from None
    except RecursionError:
        raise ConfigError([f"{file}: invalid YAML: nested too deeply"]) from None
    finally:
        loader.dispose()
