"""``python -m shiq_eval.bfcl``: the same commands as ``shiq-eval bfcl``."""

import sys

from shiq_eval.bfcl.cli import main

sys.exit(main(prog="python -m shiq_eval.bfcl"))
