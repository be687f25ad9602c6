"""YAML parsed twice over in one pass: the plain data pydantic validates, and the composed node
tree that remembers where each value was written, so an error can name its line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

Loc = Sequence[int | str]


@dataclass(frozen=True)
class Document:
    """One YAML document: its data, its node tree, and its first line (1-based)."""

    data: object
    node: Node
    line: int


class YamlSyntaxError(ValueError):
    """Malformed YAML; `line` is 1-based (0 when unknown)."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def parse_documents(text: str) -> list[Document]:
    """Every non-empty document of `text`, with safe types only (no Python objects)."""
    loader = yaml.SafeLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _refuse_duplicate_keys(node)
            data = loader.construct_document(node)
            if data is not None:
                docs.append(Document(data, node, node.start_mark.line + 1))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = exc.problem or exc.context or "malformed YAML"
        if exc.problem and exc.context and exc.context_mark is not None:
            # Where the construct the parser was in began: often the line really at fault.
            problem += f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise YamlSyntaxError(f"malformed YAML: {problem}", line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"malformed YAML: {exc}", 0) from None
    finally:
        loader.dispose()
    return docs


def _refuse_duplicate_keys(node: Node) -> None:
    """A key given twice in one mapping is an error (PyYAML would silently keep the last)."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, MappingNode):
            seen: dict[str, int] = {}
            for key, value in current.value:
                if isinstance(key, ScalarNode):
                    if key.value in seen:
                        raise yaml.MarkedYAMLError(
                            problem=f"key {key.value!r} given twice (first at line "
                            f"{seen[key.value]})",
                            problem_mark=key.start_mark,
                        )
                    seen[key.value] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(current, SequenceNode):
            stack.extend(current.value)


def _child(node: Node, part: int | str) -> tuple[Node, Node] | None:
    """(node to report, node to descend into) for one step of a location, or None."""
    if isinstance(node, MappingNode) and isinstance(part, str):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == part:
                return key, value
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item, item
    return None


def _is_union_tag(node: Node, part: int | str) -> bool:
    """pydantic puts a discriminated union's tag in error locations: `connector.files.root`."""
    if not isinstance(node, MappingNode) or not isinstance(part, str):
        return False
    return any(
        isinstance(k, ScalarNode) and k.value in ("type", "kind") and getattr(v, "value", 0) == part
        for k, v in node.value
    )


def locate(node: Node, loc: Loc) -> tuple[int, str]:
    """The line (1-based) and the readable field path (`schedules[1].cron`) of a pydantic error
    location. Union tags are dropped; a missing key points at the mapping that lacks it."""
    line = node.start_mark.line + 1
    path = ""
    for i, part in enumerate(loc):
        step = _child(node, part)
        if step is None:
            if _is_union_tag(node, part) or (i < len(loc) - 1 and not isinstance(part, int)):
                continue
            path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
            continue
        report, node = step
        line = report.start_mark.line + 1
        path += f"[{part}]" if isinstance(part, int) else f"{'.' if path else ''}{part}"
    return line, path
