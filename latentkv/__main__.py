"""`python -m latentkv ...` is the `latentkv` command."""

import sys

from .cli import main

sys.exit(main())
