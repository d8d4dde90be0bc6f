"""``python -m contrastkit ...`` (and ``torchrun -m contrastkit train ...``): the ``contrastkit`` command."""

import sys

from .cli import main

sys.exit(main())
