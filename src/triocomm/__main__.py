"""``python -m triocomm``: the same program as the ``triocomm`` command (see ``_cli``)."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
