"""The ``triocomm`` command line (its commands arrive with the command-line issue)."""

from __future__ import annotations

import argparse
import sys

from ._version import __version__

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``triocomm`` command."""
    parser = argparse.ArgumentParser(
        prog="triocomm",
        description="triocomm: message-oriented networking for Trio.",
    )
    parser.add_argument("--version", action="version", version=f"triocomm {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
