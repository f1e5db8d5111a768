"""`python -m launcher` is the `ift` program."""

import sys

from launcher.cli import main

sys.exit(main())
