"""DVC stage: extract frozen features of one dataset into zarr stores (its files were checked by `check`)."""

import sys

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.extract import run_extract

if __name__ == "__main__":
    print(run_stage(lambda: run_extract(load_params(), sys.argv[1], check_files=False)))
