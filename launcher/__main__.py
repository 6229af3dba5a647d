"""`python -m launcher ...` is the `ncft` command (use it under torchrun/srun)."""

import sys

from launcher.cli import main

sys.exit(main())
