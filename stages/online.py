"""DVC stage: Protocol C (online, cold start) on one dataset, with its learning curve."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.online import run_online

if __name__ == "__main__":
    run_stage(lambda: run_online(load_params(), sys.argv[1]))
