"""``python -m shiq_train`` (and ``torchrun -m shiq_train``): the ``shiq-train`` command."""

import sys

from shiq_train.command_line import main

sys.exit(main())
