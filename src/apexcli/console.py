"""The rich console of apex's tables: a terminal's own width, or a wide one when the output
goes to a file or a CI log (rich would otherwise cut tables to 80 columns)."""

from __future__ import annotations

import sys

from rich.console import Console

LOG_WIDTH = 160


def make_console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr) if interactive else Console(stderr=stderr, width=LOG_WIDTH)
