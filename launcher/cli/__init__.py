"""The `ncft` command: `main` builds the parser; each subcommand group has its module.

- `main`: `run`, `validate`, `plan`, `eval`, `report`, `compare`, `masked-train`, and
  `parse_args`, which takes `key=value` overrides anywhere after the spec.
- `neurons`: `ncft neurons score|inspect|overlap`.
- `compare`: the table `ncft compare` prints.
"""

from launcher.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
