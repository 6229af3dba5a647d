"""The import rules of `ncft/`, read from the source (lazy imports inside functions too).

- `ncft` is the library: it never imports the launcher, DeepSpeed or FSDP; engines
  come in through the `ncft.engine.Engine` protocol.
- Selection is built on scoring (`ncft.scoring.groups` holds the candidates and
  their scores): scoring never imports selection.
- Pure analyses (`ncft.analysis`) take numbers, not engines: they import no study.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NCFT = Path(__file__).resolve().parents[2] / "ncft"


def imported(path: Path) -> set[str]:
    """Every module `path` imports, relative imports resolved against its package."""
    package = ".".join(path.relative_to(NCFT.parent).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}".rstrip(".")
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    root = NCFT.parent / package.replace(".", "/")
    return [f"{path.relative_to(NCFT.parent)} imports {name}"
            for path in sorted(root.rglob("*.py")) for name in sorted(imported(path))
            if any(name == f or name.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize(("package", "forbidden"), [
    ("ncft", ("launcher", "deepspeed", "torch.distributed.fsdp")),
    ("ncft.scoring", ("ncft.selection",)),
    ("ncft.analysis", ("ncft.studies", "ncft.engine")),
])
def test_import_rule(package, forbidden):
    assert not offenders(package, forbidden)


def test_the_scan_sees_every_kind_of_import(tmp_path, monkeypatch):
    """The guard itself: plain, from, relative and function-local imports all count."""
    fake = tmp_path / "ncft"
    (fake / "scoring").mkdir(parents=True)
    (fake / "scoring" / "a.py").write_text(
        "import deepspeed\n"
        "from torch.distributed.fsdp import FullyShardedDataParallel\n"
        "from ..selection import topk\n"
        "def f():\n    from launcher.run import backend\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["NCFT"]), "NCFT", fake)
    found = " ".join(offenders("ncft", ("launcher", "deepspeed", "torch.distributed.fsdp")))
    assert "deepspeed" in found and "torch.distributed.fsdp" in found and "launcher" in found
    assert offenders("ncft.scoring", ("ncft.selection",))
