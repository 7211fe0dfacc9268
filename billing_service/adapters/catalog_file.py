"""The tariff catalog as a YAML file or text: read, parsed, validated by the domain.

Numbers stay their text (prices become exact Decimals), a key given twice is an error, and
every problem is reported as ``<file>:<line>: <key path>: <what to change>``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from billing_service.domain.tariff import (
    Catalog,
    CatalogError,
    Loc,
    describe_problem,
    key_path,
)


def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog file; CatalogError if it is unreadable or invalid."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CatalogError(f"{path}: cannot read the tariff catalog: {error}") from None
    return parse_catalog(text, str(path))


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps numbers as their text.

    Prices become Decimals exactly as written (0.30 stays 0.30, no binary float on the way),
    an id may be 1001, and 17:00 stays a time instead of YAML 1.1's base-60 integer 1020.
    """

    def resolve(self, kind: Any, value: Any, implicit: Any) -> str:
        tag = super().resolve(kind, value, implicit)
        if kind is yaml.ScalarNode and tag.endswith((":int", ":float")):
            return "tag:yaml.org,2002:str"
        return tag

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # PyYAML silently keeps the last of two equal keys; a catalog must not.
        seen: dict[Any, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{key.value!r} is given twice in this mapping "
                    f"(also line {seen[key.value]}); keep one",
                    key.start_mark,
                )
            seen[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)


def parse_catalog(text: str, source: str) -> Catalog:
    """Validate catalog YAML; ``source`` names it in errors (a file path)."""
    root, data = _read(text, source)
    try:
        return Catalog.model_validate(data)
    except ValidationError as error:
        problems = [_describe(problem, root, source) for problem in error.errors()]
        raise CatalogError("\n".join(problems)) from None


def locate_problems(text: str, source: str, problems: Iterable[tuple[Loc, str]]) -> list[str]:
    """Domain problems about a catalog text (``closed_period_problems``), one line each:
    ``<source>:<line>: <key path>: <message>``. CatalogError if the text is not YAML.
    """
    root, _ = _read(text, source)
    lines = []
    for loc, message in problems:
        line, path = _locate(root, loc)
        lines.append(f"{source}:{line}: {path or '(top level)'}: {message}")
    return lines


def _read(text: str, source: str) -> tuple[yaml.Node, Any]:
    """The YAML tree (for lines) and the data it holds; CatalogError if it is not YAML."""
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        root = loader.get_single_node()
        if root is None:
            raise CatalogError(
                f"{source}:1: the file is empty; it needs default_tariff and tariffs"
            )
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{mark.line + 1}: invalid YAML at column {mark.column + 1}" if mark else "1"
        context = f" ({error.context})" if error.context else ""
        raise CatalogError(f"{source}:{where}: {error.problem}{context}") from None
    except yaml.YAMLError as error:  # e.g. a control character: no mark, but a position
        line = text.count("\n", 0, getattr(error, "position", 0)) + 1
        raise CatalogError(f"{source}:{line}: invalid YAML: {str(error).splitlines()[0]}") from None
    finally:
        if loader is not None:
            loader.dispose()
    return root, data


def _describe(problem: Any, root: yaml.Node, source: str) -> str:
    """One pydantic error as '<source>:<line>: <key path>: <what to change>'."""
    loc, message = describe_problem(problem)
    line, path = _locate(root, loc)
    return f"{source}:{line}: {path or '(top level)'}: {message}"


def _locate(node: yaml.Node, loc: tuple[str | int, ...]) -> tuple[int, str]:
    """Walk the YAML tree along a pydantic location: its line and its path as written.

    A mapping's line is its key's; a missing key's is its enclosing mapping's. Pydantic
    adds a discriminated union's tag ('time_of_use') to the location; it is not in the YAML.
    Neither is ``versions[0]`` of a tariff written in the one-version form (prices at its
    top level): the path is shown as written, ``tariffs[1].energy...``.
    """
    line, shown = node.start_mark.line + 1, []
    current: yaml.Node | None = node
    skip = 0
    for position, part in enumerate(loc):
        if skip:
            skip -= 1
            continue
        if (
            part == "versions"
            and isinstance(current, yaml.MappingNode)
            and loc[position + 1 : position + 2] == (0,)
            and "versions" not in {key.value for key, _ in current.value}
        ):
            skip = 1  # the one-version form: the version's keys are the tariff's own
            continue
        if isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            current = current.value[part] if 0 <= part < len(current.value) else None
            line = current.start_mark.line + 1 if current else line
        elif isinstance(current, yaml.MappingNode):
            entries = {key.value: (key, value) for key, value in current.value}
            if part not in entries and getattr(entries.get("kind", (0, 0))[1], "value", 0) == part:
                continue
            key, current = entries.get(part, (None, None))
            line = key.start_mark.line + 1 if key else line
        else:
            current = None
        shown.append(part)
    return line, key_path(tuple(shown))
