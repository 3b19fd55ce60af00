"""Entry point of `python -m harness.aggregate` (see cli.py)."""

import sys

from harness.aggregate.cli import main

sys.exit(main())
