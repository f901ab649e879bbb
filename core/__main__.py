"""``python -m embplex``: the command line, as ``torchrun ... -m embplex train ...`` launches it."""

import sys

from .cli import main

sys.exit(main())
