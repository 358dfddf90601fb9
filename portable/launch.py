"""The programs' first step: a Ctrl-C while the command line imports (typer, rich, the CLI: ~80 ms) ends as one
later does, with one line and exit 130, instead of a traceback from deep inside an import."""

from __future__ import annotations

import os
import signal
import sys


def _interrupted(signum, frame) -> None:
    sys.stderr.write("error: interrupted\n")
    sys.stderr.flush()
    os._exit(130)  # nothing is open yet that would need closing; raising here would leave a half-imported module


def main(argv: list[str] | None = None, prog_name: str = "portable", command: str | None = None) -> None:
    """`portable`, `python prefill.py`, `python decode.py`, `python -m portable`: `portable.cli.main` once imported."""
    quiet = signal.getsignal(signal.SIGINT) is signal.default_int_handler  # (left alone where Ctrl-C is ignored)
    if quiet:
        signal.signal(signal.SIGINT, _interrupted)
    from portable.cli import main as cli_main

    if quiet:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here the CLI turns Ctrl-C into its one line
    cli_main(argv, prog_name=prog_name, command=command)
