"""``python -m balpoe ...`` (and ``torchrun --nproc_per_node N -m balpoe train RECIPE``) = the ``balpoe`` command."""

import sys

from balpoe.cli import main

sys.exit(main())
