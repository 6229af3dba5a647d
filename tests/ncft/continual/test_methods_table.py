"""The method table is the only place that knows what a method does.

`ncft.continual.methods.METHODS` describes every method with `Method` fields; the
code reads those fields and never compares a method's name. These tests read the
product's source (launcher/, ncft/, benchmarks/) for name checks, and hold the
table to the one its module docstring shows to readers.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

from ncft.continual import methods as methods_module
from ncft.continual.methods import (
    CONTINUAL_METHODS,
    METHODS,
    SINGLE_TASK_METHODS,
    Trains,
    method,
)

REPO = Path(__file__).resolve().parents[3]
TABLE = REPO / "ncft" / "continual" / "methods.py"
NAMES = set(METHODS)
# A table keyed by what a method trains (`Method.trains`) is fine; "lora" and
# "neurons" are also method names, so they alone do not make a table of methods.
ONLY_METHOD_NAMES = NAMES - set(get_args(Trains))


def _names_in(node: ast.AST) -> set[str]:
    """Method names written as string literals in `node` (a constant or a collection)."""
    items = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
    return {i.value for i in items if isinstance(i, ast.Constant) and i.value in NAMES}


def name_checks(source: str, path: str = "<src>") -> list[str]:
    """`x == "ncft"`, `x in ("lora", "olora")`, `"lora" in x`, and `{"ncft": ...}` tables."""
    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            text = " ".join(ast.unparse(s) for s in sides)
            if "method" in text and any(_names_in(s) for s in sides):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(keys & NAMES) >= 2 and keys & ONLY_METHOD_NAMES:
                found.append(f"{path}:{node.lineno}: a table keyed by method names")
    return found


def product_files() -> list[Path]:
    return [p for d in ("launcher", "ncft", "benchmarks") for p in sorted((REPO / d).rglob("*.py"))
            if p != TABLE]


def test_no_method_name_is_compared_outside_the_table():
    found = [hit for p in product_files()
             for hit in name_checks(p.read_text(), str(p.relative_to(REPO)))]
    assert not found, "read a Method field instead:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    'if spec.method == "per_task": pass',
    'if res.get("method") != "wncft": pass',
    'ok = "lora" in self.method',
    'ok = spec.method in ("lora", "olora")',
    'FAMILY = {"seqft": "full", "ncft": "neurons"}',
])
def test_the_scan_catches_each_form(snippet):
    assert name_checks(snippet)


def test_the_scan_leaves_other_strings_alone():
    assert not name_checks('if mode == "masked" and spec.method_name is None: pass\n'
                           'x = {"full": 1}\nreplace(sel, method="ncft")\n'
                           'FAMILY = {"all": "full", "lora": "lora", "neurons": "neurons"}')


def _doc_table() -> dict[str, list[str]]:
    rows = {}
    for line in methods_module.__doc__.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] in METHODS:
            rows[cells[0]] = cells[1:]
    return rows


def test_the_documented_table_is_the_table():
    """Every row of the docstring table says what the `Method` fields say."""
    doc = _doc_table()
    assert set(doc) == NAMES
    for name, (tasks, trains, start, selects, mixes) in doc.items():
        row = method(name)
        assert (tasks == "1") == (not row.continual), name
        # A one-task method has one stage, which starts from the base model.
        from_base = row.from_base or not row.continual
        assert ("base" if from_base else "previous stage") == start, name
        assert (selects == "yes") == row.selects, name
        assert mixes.startswith("yes") == row.mixes, name
        kind = {"all": "every parameter", "lora": "LoRA", "neurons": r"neurons|units"}
        assert re.search(kind[row.trains], trains), (name, trains)
        assert ("random" in trains) == row.random, name
        assert ("NEW" in trains) == row.adapter_per_task, name


def test_spec_values_are_the_table():
    assert sorted(SINGLE_TASK_METHODS + CONTINUAL_METHODS) == sorted(METHODS)
    assert not set(SINGLE_TASK_METHODS) & set(CONTINUAL_METHODS)


def test_unknown_method_names_the_field():
    with pytest.raises(ValueError, match="method: unknown 'magic'"):
        method("magic")
