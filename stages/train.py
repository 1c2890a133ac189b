"""DVC stage: train the projector of every center distribution at one norm on every category."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.train import run_train

if __name__ == "__main__":
    run_stage(lambda: run_train(load_params(), float(sys.argv[1])))
