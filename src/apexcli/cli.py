"""The ``apex`` command line: a table from command name to one function each.

Each command parses its options and calls one core function; user errors (``ApexError``)
print as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import sys

import typer

from apexcli.commands.doctor import doctor
from apexcli.commands.eval import evaluate
from apexcli.commands.pareto import pareto
from apexcli.commands.sample import sample
from apexcli.commands.score import score
from apexcli.commands.serve import serve
from apexcli.commands.soup import soup
from apexcli.commands.sweep import sweep
from apexcli.commands.train import train
from apexcli.display import printable
from apexcli.entry import caused_by_interrupt
from apexcli.errors import ApexError
from apexcli.quiet import quiet_libraries

app = typer.Typer(
    name="apex",
    help="Multi-objective online RL (APEX on Flow-GRPO) for text-to-image flow models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = {
    "train": train,
    "sample": sample,
    "score": score,
    "serve": serve,
    "eval": evaluate,
    "pareto": pareto,
    "sweep": sweep,
    "soup": soup,
    "doctor": doctor,
}


class Interrupted(Exception):
    """Ctrl-C inside a command. Typer turns a KeyboardInterrupt into a silent exit 130 (and an
    EOFError into "Aborted!"), so commands raise this instead, which ``main`` reports."""

    def __init__(self, command: str):
        super().__init__(command)
        self.command = command


def _guarded(name: str, fn):
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(name) from None
        except EOFError as exc:  # not Typer's "Aborted!": an unexpected end of input is a bug to show
            raise RuntimeError(f"unexpected end of input: {exc}") from exc
        except Exception as exc:
            if caused_by_interrupt(exc):
                raise Interrupted(name) from None
            raise

    return call


for _name, _fn in COMMANDS.items():
    app.command(_name)(_guarded(_name, _fn))


def main(argv: list[str] | None = None) -> None:
    try:
        quiet_libraries()
        app(args=argv, prog_name="apex")  # standalone: usage errors print and exit 2
    except ApexError as exc:
        print(f"error: {printable(exc)}", file=sys.stderr)  # a file name in it cannot drive the terminal
        sys.exit(2)
    except OSError as exc:
        if not _is_filesystem_error(exc):
            raise
        where = f" '{exc.filename}'" if exc.filename else ""
        print(f"error: cannot use{printable(where)}: {printable(exc.strerror or exc)}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as exc:
        hint = (
            "the last complete checkpoint is intact; continue with --resume auto"
            if getattr(exc, "command", "train") == "train"
            else "what was written so far may be incomplete"
        )
        print(f"interrupted: {hint}", file=sys.stderr)
        sys.exit(130)


def _is_filesystem_error(exc: OSError) -> bool:
    """A place the user named cannot be read or written (permissions, a file where a folder is
    expected, a full or read-only disk): one line, not a traceback. Other OSErrors are bugs."""
    kinds = (PermissionError, FileExistsError, NotADirectoryError, IsADirectoryError, FileNotFoundError)
    return isinstance(exc, kinds) or exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EIO)


if __name__ == "__main__":
    main()
