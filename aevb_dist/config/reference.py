"""docs/configuration.md, written from the schema itself: every key of `schema.Config` with its type, its
default and the comment that the schema gives it. `tests/test_config.py` checks that the file is current.

    python -m aevb_dist.config.reference > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from typing import Any

from aevb_dist.config import schema

HEADER = """# Configuration

Every key of the config schema (`aevb_dist/config/schema.py`), with its type, default and meaning. A run's
config is this schema merged with a YAML file (`configs/`) and `key=value` overrides on the command line
(`aevb-dist train CONFIG train.num_workers=2`); unknown keys and wrong types are refused in one line.
`aevb-dist config CONFIG [key=value ...]` prints the resolved config. This page is generated from the
schema (`python -m aevb_dist.config.reference > docs/configuration.md`) and checked current by the tests.
"""


def field_comments(cls: type) -> dict[str, str]:
    """The comment lines just above each field of a dataclass (and any comment after it), as one line."""
    lines, first = inspect.getsourcelines(cls)
    comments: dict[str, str] = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, row = [], node.lineno - 2  # the line before the field, 0-based
        while row >= 0 and lines[row].strip().startswith("#"):
            above.insert(0, lines[row].strip().lstrip("#").strip())
            row -= 1
        after = lines[node.lineno - 1].split("  # ", 1)[1].strip() if "  # " in lines[node.lineno - 1] else ""
        comments[node.target.id] = " ".join(part for part in [*above, after] if part)
    return comments


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _type_name(annotation: Any) -> str:
    """`int`, `list[int]`, `float or null`: how a YAML author reads a field's type."""
    name = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    if name is not None:
        return name
    args = [a for a in annotation.__args__ if a is not type(None)]
    if len(args) < len(annotation.__args__):  # Optional[X]
        return f"{_type_name(args[0])} or null"
    return str(annotation).replace("typing.", "")


def _rows(prefix: str, schema: type) -> list[str]:
    hints = inspect.get_annotations(schema, eval_str=True)
    comments = field_comments(schema)
    rows = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        default = json.dumps(_default(f), ensure_ascii=False)
        meaning = comments.get(f.name, "").replace("|", "\\|")
        item = _item_schema(hints[f.name])
        kind = (
            f"list of {{{', '.join(g.name for g in dataclasses.fields(item))}}}" if item else _type_name(hints[f.name])
        )
        rows.append(f"| `{prefix}{f.name}` | {kind} | `{default}` | {meaning} |")
        if item:  # each item's keys, with the defaults an item that leaves them out gets
            rows += _rows(f"{prefix}{f.name}[].", item)
    return rows


def _item_schema(annotation: Any):
    """The dataclass of a list-of-dataclasses field's items, else None."""
    args = getattr(annotation, "__args__", None) or ()
    return args[0] if getattr(annotation, "__origin__", None) is list and dataclasses.is_dataclass(args[0]) else None


def markdown() -> str:
    out = [HEADER, "| key | type | default | meaning |", "|---|---|---|---|", *_rows("", schema.Config), ""]
    for section in _sections():
        doc = (section.default_factory.__doc__ or "").strip()
        out += [f"## `{section.name}`", ""] + (
            [doc, ""] if doc and not doc.startswith(section.default_factory.__name__ + "(") else []
        )
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        out += [*_rows(f"{section.name}.", section.default_factory), ""]
    return "\n".join(out)


def _sections() -> list[dataclasses.Field]:
    return [s for s in dataclasses.fields(schema.Config) if dataclasses.is_dataclass(s.default_factory)]


def undocumented() -> list[str]:
    """Keys whose schema field has no comment."""
    missing = [
        f.name
        for f in dataclasses.fields(schema.Config)
        if not dataclasses.is_dataclass(f.default_factory) and not field_comments(schema.Config).get(f.name)
    ]
    for s in _sections():
        comments = field_comments(s.default_factory)
        missing += [f"{s.name}.{f.name}" for f in dataclasses.fields(s.default_factory) if not comments.get(f.name)]
    return missing


if __name__ == "__main__":
    print(markdown(), end="")
