"""``main``: the entry point of the ``triocomm`` script and of ``python -m triocomm``.

It parses the arguments, runs the command under Trio, and turns a failure
from outside the program into one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import trio

from ._arguments import build_parser, check_combinations
from ._bench import bench_command
from ._failure import EXIT_FAILED, CliFailure, leaf
from ._formatting import PROG
from ._serve import serve_command


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Bad arguments exit with status 2 (through argparse); a run that fails
    for a reason outside the program (a busy port, an unreachable peer)
    prints one line and returns 1; a failed ``bench`` (any request failed)
    prints its report and returns 1.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    check_combinations(args)
    command = serve_command if args.command == "serve" else bench_command
    try:
        return trio.run(command, args)
    except BaseException as exc:
        error = leaf(exc)
        if isinstance(error, CliFailure):
            print(f"{PROG} {args.command}: {error}", file=sys.stderr, flush=True)
            return EXIT_FAILED
        if isinstance(error, BrokenPipeError):
            # The reader went away (`triocomm bench | head -3`): nothing to
            # report to. Point stdout at /dev/null so the interpreter's final
            # flush does not complain either.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
        raise
