"""``python -m replaykit ...``: the same command line as ``replaykit ...`` (what ``torchrun -m replaykit`` runs)."""

import sys

from .cli import main

sys.exit(main())
