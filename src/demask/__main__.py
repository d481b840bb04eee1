"""`python -m demask ...` is the same as `demask ...`."""

import sys

from demask.cli import main

if __name__ == "__main__":
    sys.exit(main())
