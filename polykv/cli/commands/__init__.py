"""What each ``polykv`` command does; ``polykv.cli`` parses the command line and imports one of these.

Each module has a ``run(args)`` returning the exit status. They import torch and transformers only
when a command needs them, so ``polykv fmt`` and ``polykv validate`` start fast.
"""
