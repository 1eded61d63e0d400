"""``python -m dinfill.eval eval|score|report`` (also the module ``torchrun -m`` starts on every rank)."""

import sys

from dinfill.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
