"""YAML paths for the spec: `key.sub=value` overrides and path-located error messages.

Both walk the pydantic schema from a root model (`launcher.spec.Spec`), so an
override of an unknown key and an unknown key in the file get the same answer: the
path, and the keys that would be valid there.
"""

from __future__ import annotations

import re
import types
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from launcher.spec.tasks import SOURCE_TYPES, Problems


def apply_override(data: dict, text: str, root: type[BaseModel]) -> None:
    """Apply one `a.b[0].c=value` override to raw spec data in place.

    Raises:
        ValueError: Naming the override, for bad syntax, YAML or an unknown key.
    """
    key, sep, raw = text.partition("=")
    try:
        if not sep:
            raise ValueError("expected KEY=VALUE, e.g. training.lr=1e-4 or tasks.0.train_size=10")
        parts = _split_key(key.strip())
        value = yaml.safe_load(raw)
        node: Any = data
        schema_loc: list[str | int] = []
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            node = _override_step(node, part, schema_loc, value if last else None, last, root)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"override {text!r}: {exc}") from None


def problem_lines(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One `<yaml.path>: <problem>` line per validation error."""
    lines = []
    for err in exc.errors(include_url=False):
        path = _format_loc(err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Problems):
            lines += [f"{_join(path, rel) or '<top level>'}: {msg}" for rel, msg in cause.items]
        else:
            lines.append(f"{path or '<top level>'}: {_message(err, path, cause, root)}")
    return lines


def _split_key(key: str) -> list[str | int]:
    parts: list[str | int] = []
    for part in re.sub(r"\[(\d+)\]", r".\1", key).split("."):
        if not part:
            raise ValueError("empty key segment")
        parts.append(int(part) if part.isdigit() else part)
    return parts


def _override_step(
    node: Any, part: str | int, loc: list, value: Any, last: bool, root: type[BaseModel]
) -> Any:
    where = _format_loc(tuple(loc)) or "the top level"
    if isinstance(node, list):
        if not isinstance(part, int) or not 0 <= part < len(node):
            raise ValueError(f"{where} is a list of {len(node)}; index it with 0..{len(node) - 1}")
    elif isinstance(node, dict):
        valid = _valid_keys(tuple(loc), root)
        if isinstance(part, int) or (valid is not None and part not in valid):
            raise ValueError(f"unknown key {part!r} in {where}; valid keys: {valid}")
        if not last and node.get(part) is None:
            node[part] = {}
    else:
        raise ValueError(f"{where} is a {type(node).__name__}, not a section or list")
    loc.append(part)
    if last:
        node[part] = value
        return None
    child = node[part]
    if part == "source" and isinstance(child, dict) and child.get("type") in SOURCE_TYPES:
        loc.append(child["type"])  # the schema path of a union member carries its tag
    return child


def _format_loc(loc: tuple) -> str:
    out = ""
    for k, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif not (k and loc[k - 1] == "source" and part in SOURCE_TYPES):  # drop union tags
            out += f".{part}" if out else str(part)
    return out


def _join(base: str, rel: str) -> str:
    return rel if not base else base + (rel if rel.startswith("[") else f".{rel}")


def _message(err: dict, path: str, cause: Any, root: type[BaseModel]) -> str:
    if err["type"] == "extra_forbidden":
        return f"unknown key; valid keys here: {_valid_keys(err['loc'][:-1], root)}"
    if err["type"] == "missing":
        return "too few items" if isinstance(err["loc"][-1], int) else "required key is missing"
    if isinstance(cause, Exception):
        msg = str(cause)
        return msg.removeprefix(f"{path}: ")
    got = err.get("input")
    if isinstance(got, (str, int, float, bool)):
        return f"{err['msg']} (got {got!r})"
    return err["msg"]


def _valid_keys(loc: tuple, root: type[BaseModel]) -> list[str] | None:
    """Return the field names of the model at a pydantic-style location, if any."""
    node: Any = root
    for part in loc:
        node = _schema_step(_strip_optional(node), part)
    node = _strip_optional(node)
    is_model = isinstance(node, type) and issubclass(node, BaseModel)
    return list(node.model_fields) if is_model else None


def _schema_step(node: Any, part: str | int) -> Any:
    if isinstance(node, type) and issubclass(node, BaseModel):
        field = node.model_fields.get(part) if isinstance(part, str) else None
        return field.annotation if field else None
    if get_origin(node) is list and isinstance(part, int):
        return get_args(node)[0]
    if get_origin(node) in (Union, types.UnionType):
        for member in get_args(node):
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and get_args(tag.annotation) == (part,):
                return member
    return None


def _strip_optional(node: Any) -> Any:
    if get_origin(node) in (Union, types.UnionType):
        args = [a for a in get_args(node) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return node
