"""``python -m shiq_train`` (and ``torchrun -m shiq_train``): the ``shiq-train`` command."""

import sys

from shiq_train.launch import shiq_train

sys.exit(shiq_train())
