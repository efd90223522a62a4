"""``python -m cyllama_cffi.server MODEL --port 8000 ...``: see ``main``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
