"""``python -m lift3d``: the ``lift3d`` console script."""

import sys

from lift3d.cli import main

if __name__ == "__main__":
    sys.exit(main())
