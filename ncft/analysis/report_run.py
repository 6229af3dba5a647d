"""What `ncft.analysis.report`'s sections share: a run directory's view, markdown tables."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncft.io import write_text
from ncft.run_paths import RunPaths

Lines = list[str]


def fmt(v: Any) -> str:
    """A table cell: floats to 3 decimals, None as n/a."""
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def fmt_p(p: float | None) -> str:
    """A p-value to 2 significant digits, None as n/a."""
    return "n/a" if p is None else f"{p:.2g}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Lines:
    """A markdown table and a blank line."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return out + [""]


def matrix_table(corner: str, rows: Sequence[str], cols: Sequence[str], m: Any) -> Lines:
    """A matrix `m` as a markdown table, rows and columns labelled."""
    return table([corner, *cols], [[r, *vals] for r, vals in zip(rows, m)])


def correlation_table(title: str, corr: dict[str, Any]) -> Lines:
    """Pearson and Spearman rows (r, p, pairs) of a `correlation(...)` result."""
    return table([title, "r", "p", "pairs"],
                  [[name, corr[name]["r"], fmt_p(corr[name]["p"]), corr["n"]]
                   for name in ("pearson", "spearman")])


def require_keys(data: dict[str, Any], keys: Sequence[str], where: str) -> None:
    """Raise a ValueError naming `where` and the first of `keys` that `data` lacks."""
    for key in keys:
        if key not in data:
            raise ValueError(f"{where} is missing `{key}`")


class ReportRun:
    """One run directory's layout and the results.json it holds (if any)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = RunPaths(root)
        path = self.layout.results
        self.results: dict[str, Any] | None = None
        self.results_error: str | None = None
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                self.results_error = f"results.json is not valid JSON ({e})"
            else:
                if isinstance(data, dict):
                    self.results = data
                else:
                    self.results_error = "results.json must hold a JSON object"

    def save(self, name: str, data: Any) -> None:
        """Write `RUN/analysis/<name>.json` atomically."""
        self.layout.analysis.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        write_text(self.layout.analysis / f"{name}.json", text)

    def figure(self, name: str, alt: str, draw: Callable[[Path], Any]) -> str:
        """Draw `RUN/plots/<name>.png` with `draw(path)`; return its markdown line."""
        path = self.layout.plots / f"{name}.png"
        draw(path)
        return f"![{alt}]({path.relative_to(self.root).as_posix()})\n"

    def need_results(self, key: str | None = None) -> dict[str, Any] | str:
        """The results dict, or the note explaining why a section is skipped."""
        if self.results is None:
            return self.results_error or "no results.json in the run directory"
        if key is not None and self.results.get(key) is None:
            return f"results.json has no `{key}`"
        return self.results
