"""The ``apex`` command line: a table from command name to one function each.

Each command parses its options and calls one core function; user errors (``ApexError``)
print as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

import typer

from apexcli.commands.eval import evaluate
from apexcli.commands.pareto import pareto
from apexcli.commands.sample import sample
from apexcli.commands.score import score
from apexcli.commands.serve import serve
from apexcli.commands.soup import soup
from apexcli.commands.sweep import sweep
from apexcli.commands.train import train
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
}

for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main(argv: list[str] | None = None) -> None:
    quiet_libraries()
    try:
        app(args=argv, prog_name="apex")  # standalone: usage errors print and exit 2
    except ApexError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is intact; continue with --resume auto", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
