"""``python -m lightning_interp demo`` runs the same command line as ``lightning-interp``."""

import sys

from lightning_interp.cli import main

sys.exit(main())
