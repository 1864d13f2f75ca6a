"""``python -m polykv.cli``: the command line."""

import sys

from polykv.cli.main import main

sys.exit(main())
