"""``python -m shiq_data`` is ``shiq-data``."""

import sys

from shiq_data.cli import main

sys.exit(main())
