"""DVC stage: pooled (penultimate) features of one Protocol A dataset into a zarr store."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.detector.protocol_a import run_extract_a

if __name__ == "__main__":
    print(run_stage(lambda: run_extract_a(load_params(), sys.argv[1])))
