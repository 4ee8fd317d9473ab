"""``python -m shiq_data`` is ``shiq-data``."""

import sys

from shiq_data.launch import shiq_data

sys.exit(shiq_data())
