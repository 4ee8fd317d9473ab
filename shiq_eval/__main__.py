"""``python -m shiq_eval`` (and ``torchrun -m shiq_eval``): the ``shiq-eval`` command."""

import sys

from shiq_eval.launch import shiq_eval

sys.exit(shiq_eval())
