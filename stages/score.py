"""DVC stage: score every center distribution at one norm on every category."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.score import run_score

if __name__ == "__main__":
    run_stage(lambda: run_score(load_params(), float(sys.argv[1])))
