"""DVC stage: save the default center variant of every category as a model file for `polarocc predict`."""

from _common import run_stage

from polarocc.config import load_params
from polarocc.pipeline.export import run_export

if __name__ == "__main__":
    run_stage(lambda: run_export(load_params()))
