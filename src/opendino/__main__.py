"""``python -m opendino`` (also what ``torchrun -m opendino`` runs)."""

import sys

from opendino.cli import main

sys.exit(main())
