"""DVC stage: check every param, the backbone, weights, dataset paths and output folders before any work."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.validate import run_validate

if __name__ == "__main__":
    run_stage(lambda: run_validate(load_params()))
