"""``python -m shiq_train`` (and ``torchrun -m shiq_train``): the ``shiq-train`` command."""

from shiq_train.cli import main

main()
