"""The ``apex`` console script. Importing the command line (typer, rich, every command's options)
takes most of a second; a Ctrl-C in that second would otherwise end in a traceback, so the import
itself is guarded and answers like every later interrupt: one line, exit status 130."""

from __future__ import annotations

import sys


def caused_by_interrupt(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``exc``'s chain: Python re-raises one that arrives inside
    ``__set_name__`` (a dataclass built while a module imports) as a RuntimeError caused by it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main() -> None:
    try:
        from apexcli.cli import main as cli_main
    except BaseException as exc:
        if not caused_by_interrupt(exc):
            raise
        print("interrupted: nothing was started", file=sys.stderr)
        sys.exit(130)
    cli_main()
