"""DVC stage: decode and validate every image and mask of one dataset before extraction."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.check import run_check

if __name__ == "__main__":
    run_stage(lambda: run_check(load_params(), sys.argv[1]))
