"""The ``polykv`` command line: the parser and entry point (``main``), and what each command does (``commands``)."""

from polykv.cli.main import main

__all__ = ["main"]
