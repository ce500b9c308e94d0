"""``python -m triocomm``: the same program as the ``triocomm`` command."""

import sys

from ._cli import main

sys.exit(main())
