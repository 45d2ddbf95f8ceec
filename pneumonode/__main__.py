"""Allow `python -m pneumonode`."""

import sys

from pneumonode.cli import main

sys.exit(main())
