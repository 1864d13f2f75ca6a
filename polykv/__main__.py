"""``python -m polykv``: the same command line as the ``polykv`` script."""

from polykv.cli import main

raise SystemExit(main())
