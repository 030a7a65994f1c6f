"""The ``apex`` console script. Importing the command line (typer, rich, every command's options)
takes most of a second; a Ctrl-C in that second would otherwise end in a traceback, so the import
itself is guarded and answers like every later interrupt: one line, exit status 130."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from apexcli.cli import main as cli_main
    except KeyboardInterrupt:
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    cli_main()
