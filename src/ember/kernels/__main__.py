"""`python -m ember.kernels`: build the CPU kernels now (`make install` does), not at first start."""

import logging
import sys

from ember.kernels import load

logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(0 if load() else 1)
