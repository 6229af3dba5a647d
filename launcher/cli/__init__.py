"""The `ncft` command: `main` builds the parser; each subcommand group has its module.

- `main`: `run`, `validate`, `report`, `compare`, `masked-train`.
- `neurons`: `ncft neurons score|inspect|overlap`.
- `compare`: the table `ncft compare` prints.
"""

from launcher.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
