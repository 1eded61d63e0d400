"""``python -m dinfill ...`` (also what ``torchrun -m dinfill eval ...`` runs)."""

import sys

from dinfill.cli import main

sys.exit(main())
