"""``python -m fastvq``: the ``fastvq`` command (:mod:`fastvq.cli`); ``torchrun -m fastvq train ...`` runs DDP."""
import sys

from fastvq.cli import main

if __name__ == "__main__":
    sys.exit(main())
